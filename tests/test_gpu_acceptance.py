"""benchmarks/gpu_acceptance.py runs end to end on CPU (--smoke: tiny shapes, the interpreter)
and writes one JSON summary holding each step's status and the benchmark results it wrote."""
import glob
import json
import os
import runpy

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_acceptance_smoke_writes_one_summary(tmp_path):
    mod = runpy.run_path(os.path.join(BENCH, "gpu_acceptance.py"), run_name="bench")
    rows = mod["main"](["--smoke", "--only", "bench_head,bench_sampler", "--out",
                        str(tmp_path)])
    files = glob.glob(str(tmp_path / "gpu_acceptance_*.json"))
    assert len(files) == 1
    rec = json.load(open(files[0]))
    assert rec["config"]["smoke"] and rec["config"]["all_ok"]
    assert [r["step"] for r in rec["results"]] == ["bench_head", "bench_sampler"] == \
        [r["step"] for r in rows]
    for r in rec["results"]:
        assert r["rc"] == 0 and len(r["results"]) == 1, r["output_tail"]
        assert r["results"][0]["benchmark"] == r["step"].replace("bench_", "")


def test_acceptance_refuses_a_gpu_run_without_a_gpu(tmp_path):
    mod = runpy.run_path(os.path.join(BENCH, "gpu_acceptance.py"), run_name="bench")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        mod["main"](["--out", str(tmp_path)])


def test_perf_model_counts_every_gemm_of_the_step():
    """The one-function step's 34 GEMMs. Per row: modulation W(3WD + 2W), input dW, blocks
    2DW^2, final 2dW forward; backward twice each, except the input projection's dx (x_t needs
    no gradient). Per timestep (T = 1000): the time MLP 256W + W^2 forward, backward fc2 dW and
    dh and fc0 dW (the sinusoid needs no gradient). Per image (64, z = 256): cond_embed zW
    forward, dW and dz. Planted: a block's dW left out of the model -> fails."""
    mod = runpy.run_path(os.path.join(BENCH, "perf_model.py"), run_name="bench")
    n, W, D, d, T, B, z = 5120, 1024, 3, 64, 1000, 64, 256
    ks = mod["step_kernels"](n, W, D, d, "bf16")
    gemm = [k for k in ks if k["kernel"] == "_matmul_kernel"]
    assert len(gemm) == 34
    time_mlp = [k for k in gemm if k["op"].startswith("time ")]
    cond = [k for k in gemm if k["op"].startswith("cond_embed ")]
    per_row = [k for k in gemm if k not in time_mlp and k not in cond]
    assert (len(per_row), len(time_mlp), len(cond)) == (26, 5, 3)
    fwd = W * (3 * W * D + 2 * W) + d * W + 2 * D * W * W + 2 * d * W
    assert sum(k["flops"] for k in per_row) == 2 * n * (3 * fwd - d * W)
    assert sum(k["flops"] for k in time_mlp) == 2 * T * (2 * 256 * W + 3 * W * W)
    assert sum(k["flops"] for k in cond) == 3 * 2 * B * z * W
    peaks = dict(bf16=1e15, bw=1e12)
    for k in mod["predict"](ks, peaks, "bf16"):
        assert k["pred_ms"] == pytest.approx(max(k["flops"] / 1e15, k["bytes"] / 1e12) * 1e3)
    assert mod["peaks_for"]("NVIDIA H100 80GB HBM3")["name"] == "H100"
    assert mod["peaks_for"]("NVIDIA H100 PCIe")["name"] == "H100 PCIe"
