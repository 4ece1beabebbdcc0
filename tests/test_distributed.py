"""Two processes on gloo through torchrun, as users launch multi-GPU runs (NCCL there)."""
import json
import os
import subprocess
import sys

import torch

from helpers import save_teacher


def test_torchrun_two_process_gendd(tmp_path):
    teacher, _ = save_teacher(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gendd_fast.train", "--method", "gendd", "--dataset", "synthetic",
           "--synthetic-size", "64", "--num-classes", "4", "--image-size", "16",
           "--batch-size", "8", "--epochs", "2", "--student", "resnet8", "--teacher", "resnet8",
           "--teacher-checkpoint", teacher, "--token-dim", "32", "--diffloss-w", "32",
           "--diffloss-d", "1", "--mul", "2", "--sampling-steps", "3", "--workers", "0",
           "--device", "cpu", "--log-interval", "1", "--no-plot", "--no-progress",
           "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr
    state = torch.load(out / "last.pt", weights_only=False)
    # 64 images over 2 ranks of 8: 4 steps per epoch, every rank's RNG state kept for resume
    assert state["global_step"] == 8 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [r for r in recs if r["type"] == "val"]
    assert val and "sample_top1" in val[-1]
    # rank 0 alone writes: one train record per step
    assert [r["step"] for r in recs if r["type"] == "train"] == list(range(1, 9))
