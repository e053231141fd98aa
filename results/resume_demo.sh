#!/usr/bin/env bash
# Usage (from the repository root): bash results/resume_demo.sh [RECIPE] [KILL_AFTER_SECONDS]   (defaults: gan 100)
# Resume demonstration on a real cpu recipe: one uninterrupted training, one SIGKILLed after $KILL_AFTER s and
# resumed; both with one thread, so the two runs may share the machine without changing the arithmetic.
set -u
NAME=${1:-gan}; KILL_AFTER=${2:-100}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1 PYTHONPATH=.
rm -rf /tmp/demo_a /tmp/demo_b
MINIDALLE2_CACHE=/tmp/demo_a $PY -m minidalle2 train $NAME --preset cpu > /tmp/demo_a.log 2>&1 &
A=$!
MINIDALLE2_CACHE=/tmp/demo_b $PY -m minidalle2 train $NAME --preset cpu > /tmp/demo_b1.log 2>&1 &
B=$!
sleep $KILL_AFTER; kill -9 $B; wait $B 2>/dev/null
echo "killed run B after $KILL_AFTER s; its run dir:"; ls /tmp/demo_b/$NAME/cpu/run/
MINIDALLE2_CACHE=/tmp/demo_b $PY -m minidalle2 train $NAME --preset cpu > /tmp/demo_b2.log 2>&1
wait $A
grep -h "zoo:" /tmp/demo_b1.log /tmp/demo_b2.log /tmp/demo_a.log
$PY - <<PYEOF
from minidalle2.lab.checkpoint import load_checkpoint
import torch
a, ma = load_checkpoint("/tmp/demo_a/$NAME/cpu/model")
b, mb = load_checkpoint("/tmp/demo_b/$NAME/cpu/model")
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
print(f"uninterrupted: step {ma['step']}, {ma['seconds']:.0f} s; killed + resumed: step {mb['step']}, {mb['seconds']:.0f} s")
print("final weights bit-identical:", same, f"({len(a)} tensors)")
PYEOF
