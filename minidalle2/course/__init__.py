"""The course machinery: the notebook runner (runner.py), the exercise format and student versions
(exercises.py), and the checks the exercises call (checks/)."""

from .runner import list_notebooks, run_course, run_notebook, runtime_table  # noqa: F401
