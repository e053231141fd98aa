"""Test-session settings: a limit on the slowest notebook run, checked from the durations pytest measures; and the
fixtures several test modules share (one torch thread for tiny models, the tiny random CLIP of chapters 12-13)."""
import os

import pytest
import torch


# The smoke run of one notebook (solution or student version) may take at most this long, as pytest measures it
# for --durations: CI runs every notebook twice, and six more chapters are coming. Over it, the session fails.
NOTEBOOK_LIMIT_S = float(os.environ.get("MINIDALLE2_NOTEBOOK_LIMIT_S", 240))   # idle: the slowest is ~40 s
_notebook_seconds = {}


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed and report.nodeid.startswith("tests/test_notebooks.py::"):
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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second thread only adds overhead (on a busy 2-core machine it made a training step ~25x slower:
    500 ms instead of 19 ms). A module opts in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_clip():
    """A tiny random CLIP (embed_dim 32, text width 32) that the priors and the decoder read, in eval mode."""
    from minidalle2 import clip
    torch.manual_seed(0)
    return clip.CLIP(embed_dim=32, patch_size=8, image_width=32, image_layers=1, text_width=32, text_layers=1).eval()
