"""Untrusted program code (LLM replies, a user's file, a library published with a paper): checked, then run
in an operating-system jail.

- policy.py: what is allowed (imports, names, size and resource limits) and the test-only switch that
  turns the Python-level guards off;
- validation.py: the lint, a fast first check with clear messages, per program (not per file);
- namespace.py: what a program sees (restricted builtins, module views, the tokenizer, the spaCy pipeline);
- jail.py: the wall: bubblewrap namespaces, uid 65534, read-only view, seccomp allow-lists, rlimits;
- server.py: the warm worker inside the jail, one forked child per program run;
- channel.py: the result frames, parsed without trust on both sides;
- workers.py: the host's pool of jailed workers (`Sandbox`).
"""
from ..programs import ProgramError
from .jail import JailError
from .namespace import ReferenceTokenizer, load_reference_tokenizer, module_table
from .policy import (ALLOWED_IMPORTS, DENIED_ATTRIBUTES, MAX_FILE_CHARS, MAX_PROGRAM_CHARS, MAX_TOKENS, UNGUARDED,
                     Limits, Policy)
from .validation import check_program, validate_source
from .workers import Job, JobResult, Sandbox, close_shared_sandboxes, shared_sandbox

__all__ = ["ALLOWED_IMPORTS", "DENIED_ATTRIBUTES", "MAX_FILE_CHARS", "MAX_PROGRAM_CHARS", "MAX_TOKENS",
           "UNGUARDED", "JailError", "Job", "JobResult", "Limits", "Policy", "ProgramError", "ReferenceTokenizer",
           "Sandbox", "check_program", "close_shared_sandboxes", "load_reference_tokenizer", "module_table",
           "shared_sandbox", "validate_source"]
