"""The DataLoader path's error exit (gendd_fast/data/loader.py), as the probe ran it."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bad_image_with_two_workers_is_one_line_and_nothing_else(tmp_path):
    """With --workers 2 the right one-line error came out, then, on main, a spurious 15-line
    'Exception ignored in atexit callback ... DataLoader worker exited unexpectedly with exit
    code 143' traceback: the workers were left to the interpreter's exit. Now the loader stops
    them before the error leaves it; stderr ends with the one line."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(np.random.RandomState(i).randint(0, 255, (20, 20, 3),
                                                                 dtype=np.uint8)).save(d / f"{i}.png")
    (tmp_path / "data" / "train" / "a" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    cmd = [sys.executable, "-m", "gendd_fast.train", "--method", "ce", "--dataset", "imagefolder",
           "--data-path", str(tmp_path / "data"), "--image-size", "16", "--batch-size", "4",
           "--student", "resnet8", "--device", "cpu", "--no-plot", "--no-progress",
           "--output", str(tmp_path / "run"), "--epochs", "1", "--workers", "2"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot decode image") and "zz_broken.jpg" in lines[-1]
    assert "Traceback" not in r.stderr and "exited unexpectedly" not in r.stderr, r.stderr[-3000:]
