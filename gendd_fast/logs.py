"""What a run tells its user: a progress line, JSON-lines metrics, TensorBoard, a PNG of curves."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, Optional


def fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """One line per ``log_interval`` steps: epoch, step, loss terms, lr, img/s, ETA.

    On a terminal the line is redrawn in place; in a log file each update is its own line.
    """

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True,
                 stream=sys.stderr):
        # The ETA counts only the steps this process will run: from ``start_step`` (where a
        # resumed run picks up) to ``total_steps`` (``--max-steps`` already applied), at the
        # rate measured since the loop began.
        self.total, self.start_step = total_steps, start_step
        self.enabled, self.stream = enabled, stream
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.time()

    def eta(self, global_step: int, now: Optional[float] = None) -> float:
        """Seconds left for the steps still to run, at the rate measured so far."""
        done = global_step - self.start_step
        elapsed = (time.time() if now is None else now) - self.t0
        if done <= 0 or elapsed <= 0:
            return float("nan")
        return max(self.total - global_step, 0) * elapsed / done

    def update(self, epoch: int, epochs: int, step: int, steps: int, global_step: int,
               values: Dict[str, float], lr: float, img_s: float,
               timing: Optional[Dict[str, float]] = None):
        """``timing``: data_s / compute_s of the interval (and peak_mem_gb on CUDA)."""
        if not self.enabled:
            return
        eta = self.eta(global_step)
        terms = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        extra = ""
        if timing:
            total = max(timing["data_s"] + timing["compute_s"], 1e-9)
            extra = f" data {100 * timing['data_s'] / total:.0f}%"
            if "peak_mem_gb" in timing:
                extra += f" mem {timing['peak_mem_gb']:.1f}G"
        line = (f"epoch {epoch + 1}/{epochs} [{step:>5d}/{steps}] {terms} lr {lr:.3g} "
                f"{img_s:,.0f} img/s{extra} eta "
                f"{fmt_time(eta) if math.isfinite(eta) else '?'}")
        if self.tty:
            self.stream.write("\r" + line.ljust(110))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def end_epoch(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl``; mirrors scalars to TensorBoard.

    On resume, entries past the resumed step are dropped so the file tells one history.
    """

    def __init__(self, folder: str, tensorboard: bool = False, resume_step: Optional[int] = None):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, "metrics.jsonl")
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            keep = [line for line in open(self.path)
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as fh:
                fh.writelines(keep)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(folder, "tb"))
            except Exception as e:  # noqa: BLE001 - tensorboard not installed
                print(f"gendd_fast: TensorBoard unavailable ({e}); metrics go to "
                      f"metrics.jsonl only", file=sys.stderr)

    def write(self, kind: str, step: int, **values):
        rec = {"type": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("epoch",):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_path: str, out_png: str) -> Optional[str]:
    """Loss (train) and accuracy (val) curves from ``metrics.jsonl``; None if matplotlib lacks."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"gendd_fast: no plot ({e})", file=sys.stderr)
        return None
    train, val = [], []
    with open(metrics_path) as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                (train if rec["type"] == "train" else val if rec["type"] == "val" else []).append(rec)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss")
        for key in sorted({k for r in train for k in r} - {"type", "step", "time", "loss", "lr",
                                                            "img_s", "epoch", "data_s",
                                                            "compute_s", "peak_mem_gb"}):
            pts = [(r["step"], r[key]) for r in train if key in r]
            ax1.plot(*zip(*pts), label=key, alpha=0.7)
    ax1.set_xlabel("step")
    ax1.set_title("training loss")
    ax1.legend()
    for key in ("top1", "sample_top1"):
        pts = [(r["epoch"], r[key]) for r in val if key in r]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=key)
    ax2.set_xlabel("epoch")
    ax2.set_title("held-out top-1 (%)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
