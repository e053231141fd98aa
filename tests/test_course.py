"""Tests for the course runner (minidalle2.course) and the plotting helpers (minidalle2.viz)."""

import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pytest
import torch

from minidalle2.lab import viz
from minidalle2.course import runner as course


def write_notebook(path, *sources, params='PRESET = "cpu"'):
    nb = nbformat.v4.new_notebook()
    cells = [nbformat.v4.new_code_cell("import os")]
    if params is not None:
        p = nbformat.v4.new_code_cell(params)
        p.metadata["tags"] = ["parameters"]
        cells.append(p)
    cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nb.cells = cells
    nbformat.write(nb, str(path))
    return path

# -----------------------------------------------------------------------------
# running notebooks (each test starts a real kernel: a couple of seconds)

def test_run_notebook_injects_preset_and_writes_outputs(tmp_path):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "data.txt").write_text("hello")
    path = write_notebook(
        nbdir / "00_fixture.ipynb",
        'assert PRESET == "smoke", PRESET\nprint("preset is", PRESET)',
        'assert os.environ["MINIDALLE2_PRESET"] == "smoke"\nprint(open("data.txt").read())',  # cwd = notebook dir
        'import minidalle2\nprint("lib", minidalle2.__version__)',
    )
    run = course.run_notebook(path, "smoke", tmp_path / "out")
    assert run.ok, run.error
    assert run.name == "00_fixture" and run.error == "" and run.seconds > 0
    out = nbformat.read(str(tmp_path / "out" / "00_fixture.ipynb"), as_version=4)
    tags = [c.metadata.get("tags", []) for c in out.cells]
    assert tags.index(["injected-parameters"]) == tags.index(["parameters"]) + 1
    text = "".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []))
    assert "preset is smoke" in text and "hello" in text and "lib" in text
    assert "preset is smoke" in (tmp_path / "out" / "00_fixture.html").read_text()
    # the source notebook is untouched
    assert course.cells_with_outputs(path) == []


def test_failing_notebook_reports_cell_error_and_still_writes_html(tmp_path):
    path = write_notebook(tmp_path / "03_broken.ipynb", "x = 1", 'raise KeyError("no such thing")', "print('never')")
    run = course.run_notebook(path, "smoke", tmp_path / "out")
    assert not run.ok
    assert "03_broken" in run.error and "KeyError" in run.error and "no such thing" in run.error
    assert "cell 4" in run.error  # import, parameters, injected, x = 1, raise
    assert len(run.error) < 300  # a one-liner, not a traceback
    page = (tmp_path / "out" / "03_broken.html").read_text()
    assert "KeyError" in page
    assert (tmp_path / "out" / "03_broken.ipynb").exists()


def test_run_course_writes_site_and_records_runtimes(tmp_path, capsys):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    write_notebook(nbdir / "00_a.ipynb", "print(PRESET)")
    write_notebook(nbdir / "01_b.ipynb", "1/0")
    write_notebook(nbdir / "scratch.ipynb", "raise SystemExit")  # not a course notebook
    (nbdir / "runtimes.json").write_text(json.dumps({"00_a": {"cpu": {"seconds": 5.0, "measured_on": "x", "date": "2020-01-01"}}}))
    runs = course.run_course("smoke", nbdir, tmp_path / "site", record_runtimes=True)
    assert [r.name for r in runs] == ["00_a", "01_b"]
    assert [r.ok for r in runs] == [True, False]
    assert "ZeroDivisionError" in runs[1].error
    printed = capsys.readouterr().out
    assert "00_a" in printed and "01_b" in printed and "FAILED" in printed
    index = (tmp_path / "site" / "index.html").read_text()
    assert 'href="00_a.html"' in index and 'href="01_b.html"' in index and "FAILED" in index
    report = json.loads((tmp_path / "site" / "runtimes.json").read_text())
    assert report["preset"] == "smoke" and set(report["notebooks"]) == {"00_a", "01_b"}
    rt = json.loads((nbdir / "runtimes.json").read_text())
    assert rt["00_a"]["cpu"]["seconds"] == 5.0  # kept
    assert rt["00_a"]["smoke"]["seconds"] > 0 and rt["00_a"]["smoke"]["measured_on"]
    assert "01_b" not in rt  # failed runs are not recorded
    only = course.run_course("smoke", nbdir, tmp_path / "site2", only=["00"])
    assert [r.name for r in only] == ["00_a"]
    assert course.main(["--preset", "smoke", "--notebooks-dir", str(nbdir),
                        "--build-dir", str(tmp_path / "site3"), "--only", "01"]) == 1


def test_unknown_preset_raises(tmp_path):
    with pytest.raises(ValueError, match="smoke"):
        course.run_course("gpu", tmp_path)
    assert course.main(["--preset", "gpu", "--notebooks-dir", str(tmp_path)]) == 2


def test_notebook_without_parameters_cell_gets_preset_at_top():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(PRESET)")]
    course.inject_preset(nb, "full")
    assert nb.cells[0].metadata["tags"] == ["injected-parameters"] and "'full'" in nb.cells[0].source
    course.inject_preset(nb, "cpu")  # re-injecting replaces, never stacks
    assert len(nb.cells) == 2 and "'cpu'" in nb.cells[0].source

# -----------------------------------------------------------------------------
# listing, stripping, runtimes

def test_list_notebooks_sorted_and_filtered(tmp_path):
    for name in ["10_x.ipynb", "02_y.ipynb", "untitled.ipynb", "3_z.ipynb", "01_w.ipynb.bak"]:
        (tmp_path / name).write_text("{}")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "00_a-checkpoint.ipynb").write_text("{}")
    assert [p.name for p in course.list_notebooks(tmp_path)] == ["02_y.ipynb", "10_x.ipynb"]


def test_strip_outputs(tmp_path):
    path = write_notebook(tmp_path / "00_s.ipynb", "print(1)")
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells[2].execution_count = 3
    nb.cells[2].metadata["execution"] = {"iopub.status.busy": "2024-01-01"}
    course.inject_preset(nb, "smoke")
    nbformat.write(nb, str(path))
    assert course.cells_with_outputs(path) == [3]
    assert course.strip_outputs(path) is True
    assert course.cells_with_outputs(path) == []
    clean = nbformat.read(str(path), as_version=4)
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in clean.cells)
    assert all("execution" not in c.metadata for c in clean.cells)
    nbformat.validate(clean)
    assert course.strip_outputs(path) is False  # idempotent


def test_record_runtime_merges_atomically(tmp_path, monkeypatch):
    path = tmp_path / "runtimes.json"
    course.record_runtime(path, "07_clip", "cpu", 312.44, "box A", date="2025-01-02")
    course.record_runtime(path, "07_clip", "smoke", 4.0, "box A", date="2025-01-02")
    course.record_runtime(path, "09_ddpm", "cpu", 10, "box B")
    data = json.loads(path.read_text())
    assert data["07_clip"] == {"cpu": {"seconds": 312.4, "measured_on": "box A", "date": "2025-01-02"},
                               "smoke": {"seconds": 4.0, "measured_on": "box A", "date": "2025-01-02"}}
    assert set(data) == {"07_clip", "09_ddpm"}
    assert [p.name for p in tmp_path.iterdir()] == ["runtimes.json"]  # no temp files left

    # a crash while writing leaves the old file intact
    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        course.record_runtime(path, "09_ddpm", "full", 1, "box C")
    assert json.loads(path.read_text()) == data
    assert [p.name for p in tmp_path.iterdir()] == ["runtimes.json"]


def test_runtime_table(tmp_path):
    path = tmp_path / "runtimes.json"
    course.record_runtime(path, "07_clip", "cpu", 312.4, "Linux x86_64, 2 cores", date="2025-01-02")
    course.record_runtime(path, "07_clip", "smoke", 4.2, "Linux x86_64, 2 cores", date="2025-01-02")
    table = course.runtime_table("07_clip.ipynb", path)
    lines = table.splitlines()
    assert lines[0] == "| preset | measured time | machine | date |"
    assert lines[2] == "| smoke | 4 s | Linux x86_64, 2 cores | 2025-01-02 |"
    assert lines[3] == "| cpu | 5 min 12 s | Linux x86_64, 2 cores | 2025-01-02 |"
    assert lines[4] == "| full | not measured yet | | |"
    missing = course.runtime_table("99_none", tmp_path / "absent.json")
    assert missing.count("not measured yet") == 3


def test_machine_description_names_cpu_and_torch():
    d = course.machine_description()
    assert "cores" in d and "torch" in d

# -----------------------------------------------------------------------------
# viz

def test_to_numpy_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(2, 3, 1, 3).contiguous()
    u = viz.to_numpy_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (2, 1, 3, 3)
    assert u[0, 0, :, 0].tolist() == [0, 128, 255]
    assert viz.to_numpy_uint8(torch.zeros(4, 1, 8, 8)).shape == (4, 8, 8, 1)
    assert viz.to_numpy_uint8(np.zeros((1, 3, 2, 2), dtype=np.float32)).shape == (1, 2, 2, 3)


@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(3, 8, 8), ValueError, "single image"),
    (torch.zeros(2, 2, 8, 8), ValueError, "1 or 3 channels"),
    (torch.zeros(2, 8, 8, 3), ValueError, "1 or 3 channels"),
    (torch.full((1, 3, 4, 4), 2.0), ValueError, r"\[-1, 1\]"),
    (torch.rand(1, 3, 4, 4) + 0.5, ValueError, r"\[-1, 1\]"),
    (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), TypeError, "floats"),
    (torch.full((1, 1, 2, 2), float("nan")), ValueError, "NaN"),
    ([[0.0]], TypeError, "Tensor"),
])
def test_viz_rejects_bad_images(bad, error, match):
    with pytest.raises(error, match=match):
        viz.to_numpy_uint8(bad)
    with pytest.raises(error, match=match):
        viz.image_grid(bad)


def test_image_grid_shape_and_padding():
    x = torch.zeros(10, 3, 4, 5)
    g = viz.image_grid(x, nrow=4, padding=2)
    assert g.shape == (3, 3 * (4 + 2) + 2, 4 * (5 + 2) + 2)
    assert g[:, 0, :].eq(1).all() and g[:, 2:6, 2:7].eq(0).all()
    assert viz.image_grid(torch.zeros(3, 1, 4, 4), nrow=8, padding=0).shape == (1, 4, 12)


def test_show_grid_and_plot_curves():
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    ax = viz.show_grid(x, nrow=3)
    assert ax.images
    ax = viz.show_grid(x[:, :1], captions=[f"a small red circle above a big blue square {i}" for i in range(5)], nrow=3)
    assert len(ax.child_axes) == 5
    with pytest.raises(ValueError, match="captions"):
        viz.show_grid(x, captions=["one"])
    hist = [{"step": i, "loss": 1 / (i + 1), **({"val": 0.5} if i % 2 else {})} for i in range(10)]
    ax = viz.plot_curves(hist, ["loss", "val"])
    assert len(ax.lines) == 2 and len(ax.lines[1].get_xdata()) == 5
    with pytest.raises(ValueError, match="acc"):
        viz.plot_curves(hist, "acc")
    plt.close("all")
