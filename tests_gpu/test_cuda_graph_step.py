"""--cuda-graph on a CUDA device: the graphed step trains as the eager one does."""
import os

import torch

from gendd_fast.train import train
from helpers import read_metrics, save_teacher, tiny_config


def _run(tmp_path, teacher, graph):
    cfg = tiny_config(tmp_path / graph, "gendd", teacher, device="cuda", head="fused",
                      amp="off", cuda_graph=graph, epochs=3, sample_eval="never",
                      beta2_end=0.999, clip_grad=1.0)
    train(cfg)
    state = torch.load(os.path.join(cfg.output, "last.pt"), weights_only=True)
    return [r["loss"] for r in read_metrics(cfg.output)], state["model"], state["extra"]


def test_graphed_and_eager_steps_give_equal_losses_and_parameters(tmp_path, capfd):
    """12 steps (3 eager warm-up, the capture, 8 replays, evaluations between epochs that use
    the weights the replays wrote), fp32, lr schedule, beta2 ramp and clipping on: the per-step
    losses and every saved tensor agree with the eager run. Differences left: foreach-capturable
    against fused AdamW rounding and cuDNN's algorithm choice. A graph that froze lr or beta2 at
    their captured values, replayed stale inputs or stale cast weights drifts far past this."""
    teacher, _ = save_teacher(tmp_path / "teacher")
    eager = _run(tmp_path, teacher, "off")
    graphed = _run(tmp_path, teacher, "on")
    assert "CUDA-graphed step" in "".join(capfd.readouterr())
    assert len(eager[0]) == len(graphed[0]) == 12
    torch.testing.assert_close(torch.tensor(graphed[0]), torch.tensor(eager[0]),
                               rtol=1e-3, atol=1e-4)
    for name in ("model", "extra"):
        a, b = graphed[1 if name == "model" else 2], eager[1 if name == "model" else 2]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4,
                                       msg=lambda m, k=k: f"{k}: {m}")
