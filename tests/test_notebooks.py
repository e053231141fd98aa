"""
Every course notebook runs top to bottom at the smoke preset, and is committed without outputs.

The notebooks share one cache folder for the whole test session (MINIDALLE2_CACHE), so a
later chapter can reuse what an earlier one trained, as it does for a student.
"""

from pathlib import Path

import pytest

from minidalle2 import course

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = course.list_notebooks(NOTEBOOKS_DIR) if NOTEBOOKS_DIR.is_dir() else []
ALL_IPYNB = sorted(NOTEBOOKS_DIR.glob("*.ipynb")) if NOTEBOOKS_DIR.is_dir() else []

no_notebooks = pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks/NN_*.ipynb yet")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("minidalle2_cache")


@no_notebooks
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_smoke_preset(path, tmp_path, shared_cache):
    run = course.run_notebook(path, "smoke", tmp_path, timeout=600,
                              env={"MINIDALLE2_CACHE": str(shared_cache)})
    assert run.ok, f"{run.error}\n(executed copy with outputs: {tmp_path / path.name})"


@pytest.mark.skipif(not ALL_IPYNB, reason="no notebooks yet")
@pytest.mark.parametrize("path", ALL_IPYNB, ids=[p.stem for p in ALL_IPYNB])
def test_notebook_committed_without_outputs(path):
    cells = course.cells_with_outputs(path)
    assert not cells, f"{path.name} has outputs in cells {cells}; run `make strip` before committing"


@pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks yet")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_has_parameters_cell_with_preset(path):
    import nbformat
    nb = nbformat.read(str(path), as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{path.name}: needs exactly one code cell tagged 'parameters'"
    assert params[0].cell_type == "code" and "PRESET" in params[0].source, \
        f"{path.name}: the parameters cell must define PRESET"
