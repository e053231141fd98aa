"""
Every course notebook runs top to bottom at the smoke preset, and is committed without outputs.

The notebooks share one cache folder for the whole test session (MINIDALLE2_CACHE), so a
later chapter can reuse what an earlier one trained, as it does for a student.
"""

from pathlib import Path

import pytest

from minidalle2.course import runner as course
from minidalle2.course import exercises

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
    import nbformat
    executed = nbformat.read(str(tmp_path / path.name), as_version=4)
    for i, cell in enumerate(executed.cells):  # the solutions pass their checks
        if exercises.is_check_cell(cell):
            text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
            assert "\N{CHECK MARK}" in text, f"{path.name}: check cell {i} did not report a pass: {text!r}"


CHAPTERS = [p for p in NOTEBOOKS if not p.name.startswith("00_")]


@pytest.mark.slow
@pytest.mark.skipif(not CHAPTERS, reason="no chapter notebooks yet")
@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_student_version_fails_only_at_its_exercises(path, tmp_path, shared_cache):
    """The generated student notebook runs except at the check cells, which all fail with NotImplementedError:
    nothing downstream depends on the student's code. Past the last check, a student version is the solution
    version (which the test above runs), so it is executed only that far, and what comes after is checked by
    reading it: no later cell reads a name that only an exercise cell binds."""
    import nbformat
    solution = nbformat.read(str(path), as_version=4)
    reads = exercises.reads_of_student_code(solution)
    assert not reads, f"{path.name}: cells read names bound only by exercise cells: {reads} (cell, name, exercise)"
    student = exercises.write_student_notebooks([path], tmp_path / "student")[0]
    nbformat.write(exercises.through_last_check(nbformat.read(str(student), as_version=4)), str(student))
    run = course.run_notebook(student, "smoke", tmp_path / "run", timeout=600, allow_errors=True,
                              env={"MINIDALLE2_CACHE": str(shared_cache)})
    assert run.ok, run.error  # the kernel itself did not crash
    nb = nbformat.read(str(tmp_path / "run" / path.name), as_version=4)
    errors = exercises.errors_by_cell(nb)
    wrong = {i: e for i, e in errors.items() if e != "NotImplementedError"
             or not (exercises.is_check_cell(nb.cells[i]) or exercises.is_solution_cell(nb.cells[i]))}
    assert not wrong, f"{path.name} student version: unexpected errors {wrong} (cell: exception)"
    checks = [i for i, c in enumerate(nb.cells) if exercises.is_check_cell(c)]
    silent = [i for i in checks if i not in errors and (i - 1) not in errors]
    assert not silent, f"{path.name} student version: check cells {silent} passed without the student's code"


@pytest.mark.skipif(not CHAPTERS, reason="no chapter notebooks yet")
@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_has_two_well_formed_exercises(path):
    import nbformat
    nb = nbformat.read(str(path), as_version=4)
    assert not exercises.problems(nb, path.name)
    assert exercises.exercise_count(nb) >= 2, f"{path.name}: needs at least two exercises"


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
