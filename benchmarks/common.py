"""Shared by the benchmark scripts: device description, timing, the table and the JSON record.

Every script compares our path with the reference behaviour *in the same process*, so a figure is
always a ratio measured on one machine in one run; the JSON records the device, versions, the
exact command and the date next to the numbers.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
import time
from typing import Callable, Dict, List

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_info(device: torch.device) -> Dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}")
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def device_tag(info: Dict) -> str:
    name = info.get("gpu") or f"cpu{info['cpu_threads']}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int = 5,
            warmup: int = 1) -> Dict:
    """Median and min wall time of ``fn`` in milliseconds (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms": times[len(times) // 2], "ms_min": times[0], "repeats": repeats}


def peak_memory_mib(device: torch.device):
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)


def reset_peak(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def print_table(rows: List[Dict], columns: List[str], title: str = ""):
    if title:
        print(f"\n{title}")
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def write_result(name: str, info: Dict, config: Dict, rows: List[Dict], out_dir: str = RESULTS):
    os.makedirs(out_dir, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    rec = {"benchmark": name, "date": now.isoformat(timespec="seconds"),
           "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
           "environment": info, "config": config, "results": rows}
    path = os.path.join(out_dir, f"{name}_{device_tag(info)}_{now:%Y%m%d-%H%M%S}.json")
    with open(path, "w") as fh:
        json.dump(rec, fh, indent=2)
    print(f"\nwrote {os.path.relpath(path)}")
    return path
