"""The course machinery: the notebook runner (runner.py), the exercise format and student versions
(exercises.py), and the checks the exercises call (checks/)."""

_RUNNER = ("list_notebooks", "run_course", "run_notebook", "runtime_table")


def __getattr__(name):
    # the runner needs nbformat and nbclient; the checks a notebook imports do not
    if name in _RUNNER:
        from . import runner
        return getattr(runner, name)
    raise AttributeError(f"module 'minidalle2.course' has no attribute {name!r}")
