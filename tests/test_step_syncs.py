"""The driver's step makes as many host-device syncs as a bare Megatron-Core loop (issue 13.6).

Counted on CPU by ``bench.common.SyncCounter`` (a torch function mode recording ``.item()``,
``.tolist()``, ``float()`` of a tensor, blocking host->device copies...) around one driver step
and one bare step of ``bench/step_overhead.py``; syncs that exist only in a CPU run (torch
Adam's step counters, Megatron's Python stand-in for apex's L2 norm) are reported apart. The
one sync both loops keep is Megatron's grad-norm ``.item()``; the driver used to add a
``.tolist()`` of the reduced loss (orchestration/loop/host_copy.py says how it went away).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.seq_length=64"]


def test_driver_step_syncs_equal_the_bare_loop():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "bench/step_overhead.py", "--steps", "2", "--block", "1",
           "--warmup", "1", "--no-parts", "--micro-batch-size", "2", "--global-batch-size", "2",
           *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    syncs = dict(re.findall(r"^(driver|bare): (\d+) device sync", proc.stdout, re.MULTILINE))
    assert syncs == {"driver": "1", "bare": "1"}, proc.stdout[-3000:]
    assert "item @ megatron/core/optimizer/clip_grads.py" in proc.stdout  # the grad norm
    assert "tolist" not in proc.stdout
