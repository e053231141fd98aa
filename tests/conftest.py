"""Test-session settings.

Under pytest-xdist (`make test` runs two workers) each worker and the notebook kernels it starts use one thread: two
2-thread torch processes on a 2-core machine run many times slower than two 1-thread ones. Every test that starts a
Jupyter kernel runs on one worker, in collection order: the notebooks of a chapter load what an earlier chapter
trained into their worker's cache, and two kernels started side by side were seen to stall a cell for its whole
timeout. The other tests share the second worker, file by file."""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"   # inherited by the notebook kernels
    import torch
    torch.set_num_threads(1)


KERNEL_TESTS = ("tests/test_notebooks.py::", "tests/test_course.py::test_run_", "tests/test_course.py::test_failing_")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class KernelsOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return "kernels" if nodeid.startswith(KERNEL_TESTS) else nodeid.split("::", 1)[0]
    return KernelsOnOneWorker(config, log)


# The smoke run of one notebook (solution or student version) may take at most this long, as pytest measures it
# for --durations: CI runs every notebook twice, and six more chapters are coming. Over it, the session fails.
NOTEBOOK_LIMIT_S = float(os.environ.get("MINIDALLE2_NOTEBOOK_LIMIT_S", 120))
_notebook_seconds = {}


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed and ("::test_notebook_runs" in report.nodeid
                                                   or "::test_student_version" in report.nodeid):
        _notebook_seconds[report.nodeid] = report.duration


def pytest_sessionfinish(session, exitstatus):
    over = {k: v for k, v in _notebook_seconds.items() if v > NOTEBOOK_LIMIT_S}
    if over and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _notebook_seconds:
        slowest = max(_notebook_seconds, key=_notebook_seconds.get)
        verdict = "OVER" if _notebook_seconds[slowest] > NOTEBOOK_LIMIT_S else "within"
        terminalreporter.write_line(f"slowest notebook test: {slowest} {_notebook_seconds[slowest]:.1f} s "
                                    f"({verdict} the {NOTEBOOK_LIMIT_S} s limit of tests/conftest.py)")
