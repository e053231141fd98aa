"""Fault injection: a checkpoint save killed with SIGKILL at a random moment leaves a checkpoint that loads as the
previous one or the new one -- never neither -- and no temporary files once the checkpoint is next used."""
import os
import random
import signal
import sys
import time

import pytest
import torch

from minidalle2.lab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")


def _tensors(i):
    # 16k numbers: below torch's parallel grain size, so the forked writer never touches a thread pool
    return {"w": torch.full((64, 256), float(i)), "b": torch.arange(7) + i}


def kill_trials(path, trials, seed, max_delay=0.02, module=None):
    """Kill a process that saves checkpoints in a loop `trials` times at random moments (seeded).
    Returns (corrupt: loads failed, wrong: loaded tensors that do not match their own metadata, leftovers:
    temporary files left after the next load). `module`: another checkpoint implementation to measure."""
    save, load, error = (save_checkpoint, load_checkpoint, CheckpointError) if module is None else \
        (module.save_checkpoint, module.load_checkpoint, module.CheckpointError)
    rng = random.Random(seed)
    save(path, _tensors(0), {"kind": "kill_test", "step": 0})
    corrupt = wrong = 0
    step = 0
    for _ in range(trials):
        pid = os.fork()
        if pid == 0:                       # the writer: save step + 1, step + 2, ... until killed
            try:
                i = step
                while True:
                    i += 1
                    save(path, _tensors(i), {"kind": "kill_test", "step": i})
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.001, max_delay))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            tensors, meta = load(path)
        except error:
            corrupt += 1
            save(path, _tensors(step), {"kind": "kill_test", "step": step})   # carry on from a good one
            continue
        if meta["step"] < step or not (torch.equal(tensors["w"], _tensors(meta["step"])["w"])
                                      and torch.equal(tensors["b"], _tensors(meta["step"])["b"])):
            wrong += 1
        step = meta["step"]
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    return corrupt, wrong, leftovers


def test_a_killed_save_leaves_the_previous_or_the_new_checkpoint(tmp_path):
    corrupt, wrong, leftovers = kill_trials(tmp_path / "ckpt", trials=25, seed=0)
    assert (corrupt, wrong) == (0, 0), f"{corrupt} of 25 killed saves left a checkpoint that does not load, " \
                                       f"{wrong} one whose tensors do not match its metadata"
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_the_hash_covers_the_metadata(tmp_path):
    """Editing the metadata inside the file (not just the JSON copy beside it) is detected."""
    save_checkpoint(tmp_path / "m", _tensors(1), {"kind": "demo", "config": {"width": 8}})
    st = tmp_path / "m.safetensors"
    data = st.read_bytes()
    st.write_bytes(data.replace(b'\\"width\\":8', b'\\"width\\":9'))
    with pytest.raises(CheckpointError, match="sha256 does not match its tensors and metadata"):
        load_checkpoint(tmp_path / "m")
    # the JSON beside it is a copy for people: loading does not read it
    save_checkpoint(tmp_path / "n", _tensors(1), {"kind": "demo", "config": {"width": 8}})
    (tmp_path / "n.json").write_text('{"format": "something else"}')
    assert load_checkpoint(tmp_path / "n")[1]["config"] == {"width": 8}


if __name__ == "__main__":   # python tests/test_checkpoint_kill.py DIR TRIALS [checkpoint.py to measure instead]
    import importlib.util
    from pathlib import Path
    module = None
    if len(sys.argv) > 3:
        spec = importlib.util.spec_from_file_location("measured_checkpoint", sys.argv[3])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    corrupt, wrong, leftovers = kill_trials(Path(sys.argv[1]) / "ckpt", int(sys.argv[2]), seed=0, module=module)
    print(f"{sys.argv[2]} kills: {corrupt} left a checkpoint that does not load, {wrong} a mismatched one, "
          f"{len(leftovers)} temporary files left")
