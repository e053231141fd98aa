"""Test-session settings: a limit on the slowest notebook run, checked from the durations pytest measures."""
import os


# The smoke run of one notebook (solution or student version) may take at most this long, as pytest measures it
# for --durations: CI runs every notebook twice, and six more chapters are coming. Over it, the session fails.
NOTEBOOK_LIMIT_S = float(os.environ.get("MINIDALLE2_NOTEBOOK_LIMIT_S", 240))   # idle: the slowest is ~40 s
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
