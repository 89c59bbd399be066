"""Host memory for loading and linting one large program file (an untrusted library someone hands over).

Usage: python bench/program_file_memory.py [--chars 20000000] [--memory-cap-mb 8192]
Writes a reference-style library (tests/fixtures/reference_library.py, repeated) of `--chars` characters,
then, in a fresh process capped at `--memory-cap-mb` of address space, loads it (programs.load_programs)
and lints its first program as the sandbox does (validation.check_program). Prints the outcome (programs
loaded, or the one-line error) and that process's peak resident memory, less the same process's peak
after its imports alone.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

CHILD = r'''
import resource, sys, time
cap = int(sys.argv[2]) << 20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from attnprog.programs import ProgramError, load_programs
from attnprog.sandbox.validation import check_program
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
began = time.monotonic()
try:
    programs = load_programs(sys.argv[1])
    check_program(programs[0].source, sys.argv[1], programs[0].function)
    outcome = f"loaded {len(programs)} programs"
except ProgramError as e:
    outcome = f"failed: {e}"
except MemoryError:
    outcome = "failed: MemoryError (the cap)"
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{outcome}\npeak host memory: {peak / 1024:.0f} MB ({(peak - base) / 1024:.0f} MB above the imports), "
      f"{time.monotonic() - began:.1f} s")
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chars", type=int, default=20_000_000)
    parser.add_argument("--memory-cap-mb", type=int, default=8192)
    args = parser.parse_args()
    from fixtures.reference_library import make_library
    unit = make_library(1500)
    text = (unit * (args.chars // len(unit) + 1))[:args.chars]
    text = text[:text.rfind("\n\n\n") + 1] if len(text) > len(unit) else text  # end between functions
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "large_library.py"
        path.write_text(text)
        print(f"file: {len(text):,} characters")
        began = time.monotonic()
        subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.memory_cap_mb)], check=True)
        print(f"wall: {time.monotonic() - began:.1f} s")


if __name__ == "__main__":
    main()
