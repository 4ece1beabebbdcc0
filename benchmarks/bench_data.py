"""Data loading throughput at 224 px: DALI against the DataLoader path with 1..N workers.

    python benchmarks/bench_data.py                      # generates 512 JPEGs of 500x375
    python benchmarks/bench_data.py --images 2048 --root /fast/disk/jpegs

It writes an ImageNet-like JPEG set (class folders, 500x375, smooth random content at quality
90) once under ``--root``, then measures training-pipeline images/s (decode, random-resized-
crop, flip, normalise, batch on the training device) for: DALI on the GPU (``mixed`` nvJPEG
decoding; DALI's CPU pipeline when there is no GPU) and the DataLoader path (Pillow in worker
processes) for each worker count. The first batches are a warm-up; the rest are timed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, device_info, pick_device, print_table, sync, write_result  # noqa: E402

from gendd_fast.config import make_config  # noqa: E402
from gendd_fast.data import build_loaders  # noqa: E402
from gendd_fast.data import dali  # noqa: E402


def make_jpegs(root: str, n: int, classes: int = 8, size=(500, 375)):
    marker = os.path.join(root, f".done-{n}-{size[0]}x{size[1]}")
    if os.path.exists(marker):
        return
    g = np.random.RandomState(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        c = i % classes
        folder = os.path.join(root, "train", f"class{c:02d}")
        os.makedirs(folder, exist_ok=True)
        f = g.uniform(3, 30, size=3)
        img = np.stack([128 + 90 * np.sin(xx / f[0] + i), 128 + 90 * np.cos(yy / f[1] + c),
                        128 + 60 * np.sin((xx + yy) / f[2])], -1)
        img += g.normal(0, 12, size=img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"{i:06d}.jpg"), quality=90)
    os.makedirs(os.path.join(root, "val"), exist_ok=True)
    for c in range(classes):  # the loaders want a val split; one image per class is enough
        src = os.path.join(root, "train", f"class{c:02d}")
        dst = os.path.join(root, "val", f"class{c:02d}")
        os.makedirs(dst, exist_ok=True)
        first = sorted(os.listdir(src))[0]
        if not os.path.exists(os.path.join(dst, first)):
            os.link(os.path.join(src, first), os.path.join(dst, first))
    open(marker, "w").close()


def measure(loader, device, warmup: int, max_batches: int, min_seconds: float = 0.0):
    """Images/s over at least ``max_batches`` batches and ``min_seconds`` of decoding (epochs
    repeat until both hold: one short batch cannot support an images/s figure)."""
    loader.set_epoch(0)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    sync(device)
    t0, n, b, epoch = time.perf_counter(), 0, 0, 0
    while True:
        for x, _ in it:
            n += x.shape[0]
            b += 1
            if b >= max_batches and time.perf_counter() - t0 >= min_seconds:
                break
        else:
            epoch += 1
            loader.set_epoch(epoch)
            it = iter(loader)
            continue
        break
    sync(device)
    return n / (time.perf_counter() - t0), n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "gendd_bench_jpegs"))
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default=None,
                    help="comma-separated DataLoader worker counts (default 1,2,4,...,cores)")
    ap.add_argument("--dali-threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=0.0,
                    help="decode for at least this long per loader (repeating epochs)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    info = device_info(device)
    cores = os.cpu_count() or 1
    info["cpu_cores"] = cores
    make_jpegs(args.root, args.images)
    if args.workers:
        counts = [int(w) for w in args.workers.split(",")]
    else:
        counts, w = [], 1
        while w < cores:
            counts.append(w)
            w *= 2
        counts.append(cores)
    max_batches = max(1, args.images // args.batch - args.warmup)
    rows = []
    common = dict(method="ce", dataset="imagefolder", data_path=args.root, image_size=224,
                  batch_size=args.batch, eval_batch_size=args.batch, crop_scale=[0.08, 1.0])
    if dali.available():
        threads = args.dali_threads or min(cores, 8)
        cfg = make_config(**common, data_backend="dali", workers=threads).resolved()
        loader = build_loaders(cfg, 0, 1, device).train
        ips, n = measure(loader, device, args.warmup, max_batches, args.min_seconds)
        where = "GPU (mixed nvJPEG decode)" if device.type == "cuda" else "CPU pipeline"
        rows.append({"loader": f"DALI, {where}", "workers_or_threads": threads,
                     "images_per_s": ips, "images_timed": n})
    else:
        rows.append({"loader": "DALI", "note": "not importable here"})
    for w in counts:
        cfg = make_config(**common, data_backend="torch", workers=w).resolved()
        loader = build_loaders(cfg, 0, 1, device).train
        ips, n = measure(loader, device, args.warmup, max_batches, args.min_seconds)
        rows.append({"loader": "DataLoader + Pillow", "workers_or_threads": w,
                     "images_per_s": ips, "images_timed": n})
    best_dl = max(r.get("images_per_s", 0) for r in rows if r["loader"].startswith("DataLoader"))
    for r in rows:
        if "images_per_s" in r:
            r["vs_best_dataloader"] = r["images_per_s"] / best_dl
    cfg = dict(images=args.images, image_size="500x375 JPEG q90", output="224x224 train "
               "(random-resized-crop, flip, normalise)", batch=args.batch, warmup=args.warmup)
    print_table(rows, ["loader", "workers_or_threads", "images_per_s", "vs_best_dataloader",
                       "images_timed", "note"],
                f"data loading at 224 px on {info.get('gpu', info['device'])}, {cores} CPU cores")
    write_result("data", info, cfg, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
