"""
Exercises: the solution notebooks in notebooks/ are the source; student versions are generated.

    python -m minidalle2 student                    # notebooks/NN_*.ipynb -> build/student/
    python -m minidalle2 student notebooks/04_vae.ipynb --out hw4/

The format is nbgrader's, so a class that uses nbgrader needs nothing new:

- an exercise cell holds the student's code between `### BEGIN SOLUTION` and `### END SOLUTION`
  and carries nbgrader metadata {"solution": true, "grade": false, "grade_id": ...};
- the code cell right after it is its check: it calls a minidalle2.checks function on what the
  student wrote, and carries {"grade": true, "locked": true, "points": ...};
- a written answer (a short question the teacher grades by hand) is a markdown cell with
  {"solution": true, "grade": true, "points": ...}: it holds a model answer, which the student
  version replaces by nbgrader's "YOUR ANSWER HERE", as nbgrader does.

A student version replaces each solution block by `# YOUR CODE HERE` + `raise NotImplementedError()`
(nbgrader's stub), keeping the indentation, and drops all outputs. So the generated notebook
runs top to bottom except at the check cells, which fail with NotImplementedError until the
student writes the code; the tests check exactly that for every notebook.
"""

import copy
import re
from pathlib import Path

import nbformat

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
ANSWER_STUB = "YOUR ANSWER HERE"   # nbgrader's stub of a written answer
_MARKER = re.compile(r"^(\s*)(### (?:BEGIN|END) SOLUTION)\s*$")


class ExerciseFormatError(ValueError):
    """A notebook's exercise markup is broken (unbalanced markers, a solution without a check...)."""


def solution_metadata(grade_id):
    """nbgrader metadata of an exercise cell (the student writes here)."""
    return {"nbgrader": {"grade": False, "grade_id": grade_id, "locked": False, "schema_version": 3,
                         "solution": True, "task": False}}


def check_metadata(grade_id, points=1):
    """nbgrader metadata of the check cell after an exercise (autograded, read-only)."""
    return {"nbgrader": {"grade": True, "grade_id": grade_id, "locked": True, "points": points,
                         "schema_version": 3, "solution": False, "task": False}}


def answer_metadata(grade_id, points=1):
    """nbgrader metadata of a written answer: a markdown cell the teacher grades by hand (nbgrader's "manually graded
    answer"). The solution notebook holds a model answer there; the student version replaces it by ANSWER_STUB."""
    return {"nbgrader": {"grade": True, "grade_id": grade_id, "locked": False, "points": points, "schema_version": 3,
                         "solution": True, "task": False}}


def is_answer_cell(cell):
    return cell.cell_type == "markdown" and cell.metadata.get("nbgrader", {}).get("solution", False)


def is_solution_cell(cell):
    return cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution", False)


def is_check_cell(cell):
    return cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("grade", False)


def strip_solution(source, where="cell"):
    """Replace every BEGIN/END SOLUTION block of `source` by the indented nbgrader stub."""
    out, inside = [], False
    for number, line in enumerate(source.splitlines(), 1):
        m = _MARKER.match(line)
        if m and m.group(2) == BEGIN:
            if inside:
                raise ExerciseFormatError(f"{where}, line {number}: {BEGIN} inside another solution block")
            inside = True
            out += [m.group(1) + s for s in STUB]
        elif m:
            if not inside:
                raise ExerciseFormatError(f"{where}, line {number}: {END} without a {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ExerciseFormatError(f"{where}: {BEGIN} is never closed by {END}")
    return "\n".join(out)


def problems(nb, name="notebook"):
    """Everything wrong with a notebook's exercise markup, as readable lines (empty = fine)."""
    found, ids = [], set()
    for i, cell in enumerate(nb.cells):
        has_markers = BEGIN in cell.source or END in cell.source
        where = f"{name}: cell {i}"
        if has_markers and not is_solution_cell(cell):
            found.append(f"{where} has solution markers but no nbgrader solution metadata")
        if is_solution_cell(cell):
            try:
                strip_solution(cell.source, where)
            except ExerciseFormatError as e:
                found.append(str(e))
            if not has_markers:
                found.append(f"{where} is a solution cell without {BEGIN} / {END}")
            if i + 1 >= len(nb.cells) or not is_check_cell(nb.cells[i + 1]):
                found.append(f"{where} (exercise) is not followed by a check cell")
        if is_answer_cell(cell) and not (cell.metadata["nbgrader"].get("grade") and
                                         cell.metadata["nbgrader"].get("points")):
            found.append(f"{where} (a written answer) needs nbgrader grade: true and its points")
        if is_solution_cell(cell) or is_check_cell(cell) or is_answer_cell(cell):
            grade_id = cell.metadata["nbgrader"].get("grade_id")
            if not grade_id or grade_id in ids:
                found.append(f"{where}: grade_id {grade_id!r} is missing or used twice")
            ids.add(grade_id)
    return found


def exercise_count(nb):
    return sum(is_solution_cell(c) for c in nb.cells)


def student_version(nb, name="notebook"):
    """A copy of `nb` with every solution replaced by the stub, every written answer by ANSWER_STUB, and no outputs."""
    issues = problems(nb, name)
    if issues:
        raise ExerciseFormatError("; ".join(issues))
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):
        if is_solution_cell(cell):
            cell.source = strip_solution(cell.source, f"{name}: cell {i}")
        if is_answer_cell(cell):
            cell.source = ANSWER_STUB
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def write_student_notebooks(paths, out_dir):
    """Write the student version of each notebook into out_dir; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in map(Path, paths):
        nb = student_version(nbformat.read(str(path), as_version=4), path.name)
        dest = out_dir / path.name
        nbformat.write(nb, str(dest))
        written.append(dest)
    return written


def errors_by_cell(nb):
    """{cell index: exception name} for every cell of an executed notebook that raised."""
    return {i: out.get("ename", "Error") for i, c in enumerate(nb.cells)
            for out in c.get("outputs", []) if out.get("output_type") == "error"}


def _bound_and_read(source):
    """(names a cell binds at its top level, names it reads anywhere), from its code (magics and shell lines skipped).
    Names local to a function the cell defines are not bound by the cell."""
    import ast
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    tree = ast.parse(code)
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            read.add(node.id)
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)                                    # its body is its own scope
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif not isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            todo.extend(ast.iter_child_nodes(node))
    return bound, read


def reads_of_student_code(nb):
    """[(cell, name, exercise cell)] for every cell -- other than exercises and their checks -- that reads a name an
    exercise cell binds (before another cell rebinds it). In the student version such a cell would fail with the
    student's NotImplementedError, so the rest of the notebook would depend on the student's code."""
    from_exercise, found = {}, []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        bound, read = _bound_and_read(cell.source)
        if is_solution_cell(cell):
            from_exercise.update({name: i for name in bound})
            continue
        if not is_check_cell(cell):   # a name the cell binds itself is taken to be its own
            found += [(i, name, from_exercise[name]) for name in sorted((read - bound) & set(from_exercise))]
        for name in bound:
            from_exercise.pop(name, None)
    return found


def through_last_check(nb):
    """A copy of `nb` that ends at its last check cell: what of a student version depends on the student's code."""
    checks = [i for i, c in enumerate(nb.cells) if is_check_cell(c)]
    nb = copy.deepcopy(nb)
    if checks:
        nb.cells = nb.cells[:checks[-1] + 1]
    return nb
