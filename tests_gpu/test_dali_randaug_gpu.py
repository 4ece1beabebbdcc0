"""timm's RandAugment in DALI on the GPU: the deterministic ops against timm on fixed images
(the CPU twin is tests/test_dali.py::test_dali_randaugment_ops_match_timm_on_deterministic_ops),
and the GPU file pipeline with RandAugment before normalising. Not run on a GPU by the session
that wrote it (no device was lent): run `python -m pytest -q tests_gpu/test_dali_randaug_gpu.py`."""
import torch

from test_dali import collect, dali_vs_timm_errors, image_folder  # tests/ is on sys.path
from gendd_fast.config import make_config
from gendd_fast.data import build_loaders

EXACT = ("Invert", "Posterize", "Solarize", "SolarizeAdd", "PosterizeIncreasing",
         "SolarizeIncreasing")


def test_gpu_randaugment_ops_match_timm_on_deterministic_ops():
    errs = dali_vs_timm_errors(device_id=torch.cuda.current_device())
    for (name, level), e in errs.items():
        assert e <= (0 if name in EXACT else 1), (name, level, e)


def test_gpu_file_pipeline_with_randaugment(tmp_path):
    root = image_folder(tmp_path, [(40, 40)] * 4, fmt="jpg")
    cfg = make_config(method="ce", dataset="imagefolder", data_path=root, image_size=32,
                      val_resize=36, batch_size=4, workers=2, data_backend="dali",
                      randaug="rand-m7-n2-mstd0.5").resolved()
    L = build_loaders(cfg, 0, 1, torch.device("cuda"))
    x, _, _ = collect(L.train)
    assert x.is_cuda and x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all()
