"""
Run the course: execute every notebook at a preset and build the course site.

    python -m minidalle2 course --preset smoke      # or: make course PRESET=smoke

The parameters convention (papermill's): every notebook has one code cell tagged
`parameters` (cell metadata "tags": ["parameters"]) that defines the preset,

    PRESET = "cpu"  # smoke | cpu | full

and the runner inserts right after it a cell tagged `injected-parameters` that sets
PRESET to the preset asked for. The kernel also gets MINIDALLE2_PRESET in its
environment. Each notebook runs in a fresh kernel with the notebook's own folder as
the working directory; its executed copy (.ipynb) and an HTML page land in the build
folder, also when it fails, so the error can be read there.

Notebooks are committed without outputs: `strip_outputs` cleans one, and
`cells_with_outputs` is what the tests use to check.

Measured run times live in notebooks/runtimes.json, written by
`run_course(..., record_runtimes=True)` and shown in each notebook's header by
`runtime_table`. Nobody types those numbers in by hand.
"""

import argparse
import datetime
import html
import json
import os
import re
import sys
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import nbformat

from ..lab.checkpoint import atomic_write_bytes
from ..lab.presets import PRESETS, check_preset
from ..lab.train import machine_description

REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the minidalle2 package
NOTEBOOK_RE = re.compile(r"^\d\d_\w+\.ipynb$")
DEFAULT_CELL_TIMEOUT = 3600  # seconds for one cell; a cpu-preset training cell is ~10 minutes


@dataclass
class NotebookRun:
    name: str             # e.g. "07_clip"
    seconds: float        # wall time, kernel start to finish
    ok: bool
    error: str = ""       # "07_clip: cell 12: ValueError: ..." when not ok

# -----------------------------------------------------------------------------
# finding and cleaning notebooks

def list_notebooks(notebooks_dir="notebooks"):
    """The course's notebooks, NN_name.ipynb, in order."""
    return sorted(p for p in Path(notebooks_dir).iterdir() if p.is_file() and NOTEBOOK_RE.match(p.name))


def cells_with_outputs(path):
    """Indices of code cells that carry outputs or an execution count (should be none in git)."""
    nb = nbformat.read(str(path), as_version=4)
    return [i for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]


def strip_outputs(path):
    """Remove outputs, execution counts, run metadata and injected cells in place. Returns True if changed."""
    path = Path(path)
    before = path.read_text()
    nb = nbformat.reads(before, as_version=4)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs = []
            c.execution_count = None
        c.metadata.pop("execution", None)  # timestamps nbclient adds
    nb.metadata.pop("papermill", None)
    after = nbformat.writes(nb) + "\n"
    if after != before:
        _atomic_write(path, after)
    return after != before

# -----------------------------------------------------------------------------
# running one notebook

def inject_preset(nb, preset):
    """Insert `PRESET = "<preset>"` after the `parameters` cell (at the top if there is none)."""
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    cell = nbformat.v4.new_code_cell(f"# Parameters injected by minidalle2.course\nPRESET = {preset!r}\n")
    cell.metadata["tags"] = ["injected-parameters"]
    if (nb.nbformat, nb.nbformat_minor) < (4, 5):
        cell.pop("id", None)  # cell ids arrived in nbformat 4.5
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    nb.cells.insert(tagged[0] + 1 if tagged else 0, cell)
    return nb


def _failed_cell(nb):
    """Index, ename, evalue of the first cell with an error output (None if there is none)."""
    for i, c in enumerate(nb.cells):
        for out in c.get("outputs", []):
            if out.get("output_type") == "error":
                return i, out.get("ename", "Error"), out.get("evalue", "")
    return None


def _kernel_env(preset, env):
    e = dict(os.environ)
    e["MINIDALLE2_PRESET"] = preset
    # the kernel imports the same minidalle2 as the runner, installed or not
    e["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), e.get("PYTHONPATH", "")] if p)
    e.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silence a debugger warning in every kernel
    e.update(env or {})
    return e


def run_notebook(path, preset, out_dir, timeout=DEFAULT_CELL_TIMEOUT, env=None, allow_errors=False):
    """
    Execute one notebook at `preset` in a fresh kernel; write out_dir/NAME.ipynb and NAME.html.
    `timeout` is per cell in seconds; `env` adds variables to the kernel's environment.
    allow_errors=True runs every cell even after one raises (for student versions); the
    errors are then in the executed copy (see exercises.errors_by_cell), not in the result.
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path, out_dir = Path(path).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = inject_preset(nbformat.read(str(path), as_version=4), preset)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(path.parent)}},
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])  # no kernel-app chatter
    error = ""
    t0 = time.perf_counter()
    try:
        client.execute(env=_kernel_env(preset, env))
    except CellExecutionError as e:
        error = f"{e.ename}: {e.evalue}"
    except CellTimeoutError:
        error = f"CellTimeoutError: a cell ran longer than {timeout} s"
    except DeadKernelError as e:
        error = f"DeadKernelError: {e}"
    except Exception as e:  # kernel failed to start, bad notebook, ...
        error = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    if error:
        where = _failed_cell(nb)
        if where is not None:
            error = f"cell {where[0]}: {where[1]}: {where[2]}"
        error = f"{path.stem}: {error}"
        if len(error) > 500:
            error = error[:500] + " ..."  # the full traceback is in the executed copy
    nbformat.write(nb, str(out_dir / path.name))
    _write_html(nb, out_dir / (path.stem + ".html"))
    return NotebookRun(path.stem, round(seconds, 1), not error, error)


def _write_html(nb, dest):
    from nbconvert import HTMLExporter
    body, _ = HTMLExporter().from_notebook_node(nb)
    Path(dest).write_text(body, encoding="utf-8")

# -----------------------------------------------------------------------------
# running the whole course

def record_runtime(runtimes_path, notebook_name, preset, seconds, measured_on, date=None):
    """Merge one measurement into runtimes.json (read, update, atomic replace)."""
    runtimes_path = Path(runtimes_path)
    data = json.loads(runtimes_path.read_text()) if runtimes_path.exists() else {}
    data.setdefault(notebook_name, {})[preset] = {
        "seconds": round(float(seconds), 1),
        "measured_on": measured_on,
        "date": date or datetime.date.today().isoformat(),
    }
    _atomic_write(runtimes_path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


def run_course(preset, notebooks_dir="notebooks", build_dir=None, only=None,
               record_runtimes=False, timeout=DEFAULT_CELL_TIMEOUT, env=None):
    """
    Run every notebook in order, each in a fresh kernel; write the site into build_dir
    (default build/course/<preset>): executed notebooks, HTML pages, index.html, runtimes.json.
    `only`: names or prefixes to run ("07", "07_clip"). With record_runtimes=True the times
    of successful runs are merged into notebooks_dir/runtimes.json.
    """
    check_preset(preset)
    build_dir = Path(build_dir or Path("build") / "course" / preset)
    notebooks = list_notebooks(notebooks_dir)
    if only:
        only = [only] if isinstance(only, str) else list(only)
        notebooks = [p for p in notebooks if any(p.stem == o or p.stem.startswith(o) for o in only)]
    if not notebooks:
        raise ValueError(f"no notebooks to run in {notebooks_dir}" + (f" matching {only}" if only else ""))
    measured_on = machine_description()
    print(f"running {len(notebooks)} notebooks at preset {preset!r} on {measured_on}", flush=True)
    runs = []
    for k, path in enumerate(notebooks):
        run = run_notebook(path, preset, build_dir, timeout=timeout, env=env)
        runs.append(run)
        print(f"[{k + 1:2d}/{len(notebooks)}] {path.stem:<40s} {'ok' if run.ok else 'FAILED':<6s} {run.seconds:8.1f} s",
              flush=True)
        if not run.ok:
            print(f"    {run.error}", flush=True)
        if run.ok and record_runtimes:
            record_runtime(Path(notebooks_dir) / "runtimes.json", run.name, preset, run.seconds, measured_on)
        _write_reports(build_dir, preset, runs, measured_on)
    failed = [r for r in runs if not r.ok]
    total = sum(r.seconds for r in runs)
    print(f"{len(runs) - len(failed)}/{len(runs)} notebooks ok in {total:.1f} s; site: {build_dir / 'index.html'}")
    return runs


def _write_reports(build_dir, preset, runs, measured_on):
    report = {"preset": preset, "measured_on": measured_on,
              "date": datetime.date.today().isoformat(),
              "notebooks": {r.name: asdict(r) for r in runs}}
    _atomic_write(Path(build_dir) / "runtimes.json", json.dumps(report, indent=2) + "\n")
    rows = "\n".join(
        f'<tr><td><a href="{html.escape(r.name)}.html">{html.escape(r.name)}</a></td>'
        f'<td class="{"ok" if r.ok else "failed"}">{"ok" if r.ok else "FAILED"}</td>'
        f'<td style="text-align:right">{r.seconds:.1f} s</td><td>{html.escape(r.error)}</td></tr>'
        for r in runs)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>minidalle2 course ({html.escape(preset)})</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 12px;border-bottom:1px solid #ddd}}
.ok{{color:#080}} .failed{{color:#c00;font-weight:bold}}</style></head><body>
<h1>minidalle2 course: preset <code>{html.escape(preset)}</code></h1>
<p>Run on {html.escape(measured_on)}, {datetime.date.today().isoformat()}.</p>
<table><tr><th>notebook</th><th>status</th><th>time</th><th>error</th></tr>
{rows}
</table></body></html>
"""
    _atomic_write(Path(build_dir) / "index.html", page)

# -----------------------------------------------------------------------------
# the runtime table in each notebook's header

def runtime_table(notebook_name, runtimes_path=None, presets=PRESETS):
    """Markdown table of measured run times; use: display(Markdown(runtime_table("07_clip")))."""
    name = Path(notebook_name).stem
    if runtimes_path is None:
        candidates = [Path("runtimes.json"), REPO_ROOT / "notebooks" / "runtimes.json"]
        runtimes_path = next((p for p in candidates if p.exists()), candidates[-1])
    runtimes_path = Path(runtimes_path)
    data = json.loads(runtimes_path.read_text()).get(name, {}) if runtimes_path.exists() else {}
    lines = ["| preset | measured time | machine | date |", "|---|---|---|---|"]
    for p in list(presets) + sorted(set(data) - set(presets)):
        m = data.get(p)
        if m:
            lines.append(f"| {p} | {_fmt_seconds(m['seconds'])} | {m.get('measured_on', '?')} | {m.get('date', '?')} |")
        else:
            lines.append(f"| {p} | not measured yet | | |")
    return "\n".join(lines)


def _fmt_seconds(s):
    s = float(s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"

# -----------------------------------------------------------------------------
# helpers and the command line

def _atomic_write(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def add_arguments(parser):
    """The `course` command's options (shared with `python -m minidalle2 course`)."""
    parser.add_argument("--preset", default="cpu", help="smoke | cpu | full (default: cpu)")
    parser.add_argument("--notebooks-dir", default="notebooks")
    parser.add_argument("--build-dir", default=None, help="default: build/course/<preset>")
    parser.add_argument("--only", nargs="+", default=None, help="notebook names or prefixes, e.g. 00 07_clip")
    parser.add_argument("--record-runtimes", action="store_true",
                        help="merge measured times into <notebooks-dir>/runtimes.json")
    parser.add_argument("--timeout", type=int, default=DEFAULT_CELL_TIMEOUT, help="seconds per cell")
    parser.add_argument("--strip", action="store_true",
                        help="instead of running: strip outputs from the notebooks in place")
    return parser


def main(argv=None):
    """Entry point: returns the process exit code (1 if any notebook failed)."""
    parser = add_arguments(argparse.ArgumentParser(prog="minidalle2 course", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    if args.strip:
        for p in list_notebooks(args.notebooks_dir):
            if strip_outputs(p):
                print(f"stripped {p}")
        return 0
    try:
        runs = run_course(args.preset, args.notebooks_dir, args.build_dir, args.only,
                          args.record_runtimes, args.timeout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
