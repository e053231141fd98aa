"""The exercise mechanism: nbgrader-format solution cells -> student versions, and the check helpers."""

import nbformat
import pytest
import torch

from minidalle2.course import exercises
from minidalle2.__main__ import main as cli
from minidalle2.course.checks import CheckFailed, call, expect_close, expect_scalar, expect_shape, passed

SOLUTION = '''def square(x):
    """x squared."""
    ### BEGIN SOLUTION
    y = x * x
    return y
    ### END SOLUTION

print("defined")'''


def make_notebook(solution=SOLUTION, with_check=True):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell("# An exercise"))
    nb.cells.append(nbformat.v4.new_code_cell(solution, metadata=exercises.solution_metadata("ex_square")))
    if with_check:
        nb.cells.append(nbformat.v4.new_code_cell("assert square(3) == 9",
                                                  metadata=exercises.check_metadata("ex_square_check")))
    nb.cells.append(nbformat.v4.new_code_cell("print('after')"))
    return nb


def test_strip_solution_keeps_indentation_and_the_rest():
    out = exercises.strip_solution(SOLUTION)
    assert out.splitlines() == ['def square(x):', '    """x squared."""', '    # YOUR CODE HERE',
                                '    raise NotImplementedError()', '', 'print("defined")']
    namespace = {}
    exec(out, namespace)  # the stub is valid Python and raises when called
    with pytest.raises(NotImplementedError):
        namespace["square"](2)


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without a ### BEGIN"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another"),
])
def test_unbalanced_markers_are_named(source, message):
    with pytest.raises(exercises.ExerciseFormatError, match=message):
        exercises.strip_solution(source)


def test_student_version_strips_solutions_and_outputs_only():
    nb = make_notebook()
    nb.cells[3].outputs = [nbformat.v4.new_output("stream", text="after\n")]
    student = exercises.student_version(nb)
    assert "x * x" not in student.cells[1].source and "raise NotImplementedError()" in student.cells[1].source
    assert student.cells[2].source == nb.cells[2].source  # the check is kept as it is
    assert student.cells[3].outputs == []
    assert "x * x" in nb.cells[1].source  # the source notebook is untouched
    assert exercises.exercise_count(student) == 1


def test_problems_finds_missing_check_missing_metadata_and_duplicate_ids():
    assert exercises.problems(make_notebook()) == []
    assert any("not followed by a check" in p for p in exercises.problems(make_notebook(with_check=False)))
    nb = make_notebook()
    nb.cells[1].metadata = {}
    assert any("no nbgrader solution metadata" in p for p in exercises.problems(nb))
    nb = make_notebook()
    nb.cells[2].metadata = exercises.check_metadata("ex_square")
    assert any("used twice" in p for p in exercises.problems(nb))
    with pytest.raises(exercises.ExerciseFormatError, match="not followed by a check"):
        exercises.student_version(make_notebook(with_check=False))


def test_metadata_is_nbgrader_schema_3():
    sol, chk = exercises.solution_metadata("a")["nbgrader"], exercises.check_metadata("b", 2)["nbgrader"]
    assert sol["solution"] and not sol["grade"] and not sol["locked"] and sol["schema_version"] == 3
    assert chk["grade"] and chk["locked"] and chk["points"] == 2 and not chk["solution"]


def test_student_cli_writes_versions(tmp_path, capsys):
    src = tmp_path / "01_demo.ipynb"
    nbformat.write(make_notebook(), str(src))
    assert cli(["student", str(src), "--out", str(tmp_path / "out")]) == 0
    written = nbformat.read(str(tmp_path / "out" / "01_demo.ipynb"), as_version=4)
    assert "NotImplementedError" in written.cells[1].source
    assert "1 exercises" in capsys.readouterr().out
    bad = tmp_path / "02_bad.ipynb"
    nbformat.write(make_notebook(solution="### BEGIN SOLUTION\nx = 1"), str(bad))
    assert cli(["student", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "never closed" in capsys.readouterr().err


def test_errors_by_cell_reads_executed_outputs():
    nb = make_notebook()
    nb.cells[2].outputs = [nbformat.v4.new_output("error", ename="NotImplementedError", evalue="", traceback=[])]
    assert exercises.errors_by_cell(nb) == {2: "NotImplementedError"}


# ----------------------------------------------------------------------------- check helpers

def test_call_explains_not_implemented_and_crashes():
    def todo(x):
        raise NotImplementedError()
    with pytest.raises(NotImplementedError, match="todo is not written yet"):
        call(todo, 1)
    with pytest.raises(CheckFailed, match="raised ZeroDivisionError"):
        call(lambda x: x / 0, 1, name="divide")
    with pytest.raises(CheckFailed, match="expected a function"):
        call(3, name="f")


def test_expectations_name_what_is_wrong(capsys):
    x = torch.arange(6.0).reshape(2, 3)
    assert expect_shape(x, (2, 3), "x") is x
    with pytest.raises(CheckFailed, match=r"wrong shape: got \(2, 3\), expected \(3, 2\)"):
        expect_shape(x, (3, 2), "x")
    with pytest.raises(CheckFailed, match="expected a torch.Tensor"):
        expect_shape([1, 2], (2,), "x")
    with pytest.raises(CheckFailed, match="did you forget"):
        expect_scalar(x, "loss")
    expect_close(x + 1e-7, x, "x")
    y = x.clone()
    y[1, 2] += 0.5
    with pytest.raises(CheckFailed, match=r"1 of 6 differ; largest difference 0.5 at index \(1, 2\)"):
        expect_close(y, x, "x")
    with pytest.raises(CheckFailed, match="NaN"):
        expect_close(x * float("nan"), x, "x")
    passed("demo", "all good")
    assert "demo: correct - all good" in capsys.readouterr().out


def _exercise_notebook(*later):
    nb = nbformat.v4.new_notebook()
    sol = nbformat.v4.new_code_cell("def f(x):\n    ### BEGIN SOLUTION\n    y = x + 1\n    return y\n    ### END SOLUTION")
    sol.metadata.update(exercises.solution_metadata("f"))
    check = nbformat.v4.new_code_cell("check(f)")
    check.metadata.update(exercises.check_metadata("f_check"))
    nb.cells = [sol, check] + [nbformat.v4.new_code_cell(s) for s in later]
    return nb


def test_reads_of_student_code_finds_later_cells_that_depend_on_an_exercise():
    # the exercise's function is called later (a dependency); its local `y` is not a name the notebook shares
    nb = _exercise_notebook("z = f(2)\ny = 3\nprint(y)", "def f(x):\n    return x\nprint(f(1))")
    assert exercises.reads_of_student_code(nb) == [(2, "f", 0)]      # cell 3 rebinds f before reading it
    assert exercises.reads_of_student_code(_exercise_notebook("print(y)", "%time g = [v for v in range(3)]")) == []


def test_through_last_check_ends_at_the_last_check_cell():
    nb = _exercise_notebook("print(1)", "print(2)")
    short = exercises.through_last_check(nb)
    assert len(short.cells) == 2 and exercises.is_check_cell(short.cells[-1]) and len(nb.cells) == 4
    plain = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    assert len(exercises.through_last_check(plain).cells) == 1
