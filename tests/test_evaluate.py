"""gendd_fast.evaluate: top-1/top-5 counting, the cross-rank sum of a sharded evaluation, the
training mode restored, and sampled logits averaged before classifying."""
import json
import os

import pytest
import torch
import torch.nn as nn

from gendd_fast.distill.distillers import Distiller
from gendd_fast.evaluate import evaluate
from helpers import _small_gendd


# Guards from the mutation run (moved from test_mutation_guards.py): each pins a behaviour the rest
# of the suite did not, with inputs where the wrong and right formulas disagree; each docstring
# names the planted bugs it was run against and failed on.


HERE = os.path.dirname(os.path.abspath(__file__))


HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# Evaluation: top-5 and the cross-rank reduction
# ---------------------------------------------------------------------------------------------
class FixedLogits(Distiller):
    """Serves prepared logits batch by batch; the 'sample_' logits rank the label differently."""

    def __init__(self, logits, sample_logits=None):
        super().__init__(nn.Identity())
        self.batches, self.sample_batches = list(logits), list(sample_logits or [])

    @torch.no_grad()
    def eval_logits(self, images, autocast, sample=False, **_):
        out = {"": self.batches.pop(0)}
        if sample:
            out["sample_"] = self.sample_batches.pop(0)
        return out


def logits_with_label_rank(labels, ranks, K, gen):
    """Logits (n, K) in which ``labels[i]`` is the ``ranks[i]``-th largest (1 = top)."""
    rows = []
    for y, r in zip(labels.tolist(), ranks.tolist()):
        vals = torch.sort(torch.rand(K, generator=gen) * 10 + 1, descending=True).values
        others = [c for c in torch.randperm(K, generator=gen).tolist() if c != y]
        order = others[: r - 1] + [y] + others[r - 1:]
        row = torch.empty(K)
        row[torch.tensor(order)] = vals
        rows.append(row)
    return torch.stack(rows)


def test_top5_counts_labels_ranked_second_to_fifth_and_not_sixth():
    """Planted: top-5 computed as top-1; top-4 / top-6 windows; the sampled logits scored
    with the probe's hits."""
    gen = torch.Generator().manual_seed(3)
    K, n = 10, 40
    labels = torch.randint(0, K, (n,), generator=gen)
    ranks = torch.tensor([1, 2, 3, 4, 5, 6, 7, 10] * 5)
    s_ranks = torch.roll(ranks, 3)  # a different mix of ranks for the sampled logits
    lg = logits_with_label_rank(labels, ranks, K, gen)
    slg = logits_with_label_rank(labels, s_ranks, K, gen)
    for i in range(n):  # the construction itself
        assert int((lg[i] > lg[i, labels[i]]).sum()) + 1 == ranks[i]
    loader = [(torch.zeros(8, 1), labels[i:i + 8]) for i in range(0, n, 8)]
    model = FixedLogits(lg.split(8), slg.split(8))
    res = evaluate(model, loader, torch.device("cpu"), sample=True)
    assert res["n"] == n
    assert res["top1"] == pytest.approx(100.0 * (ranks == 1).sum().item() / n)
    assert res["top5"] == pytest.approx(100.0 * (ranks <= 5).sum().item() / n)
    assert res["sample_top1"] == pytest.approx(100.0 * (s_ranks == 1).sum().item() / n)
    assert res["sample_top5"] == pytest.approx(100.0 * (s_ranks <= 5).sum().item() / n)


def test_top5_with_fewer_than_five_classes_is_every_image():
    """With K < 5 classes every label is within the top K: top-5 is 100, top-1 is not."""
    y = torch.tensor([0, 1, 2, 2])
    lg = torch.tensor([[3.0, 2, 1], [3.0, 2, 1], [3.0, 2, 1], [1.0, 2, 3]])
    res = evaluate(FixedLogits([lg]), [(torch.zeros(4, 1), y)], torch.device("cpu"))
    assert res["top1"] == pytest.approx(50.0) and res["top5"] == pytest.approx(100.0)


_WORKER = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_evaluate import eval_fixture
from gendd_fast.distributed import init_distributed, shutdown
from gendd_fast.evaluate import evaluate
env = init_distributed("cpu")
model, shards = eval_fixture({ckpt!r})
res = evaluate(model, shards[env.rank], env.device, sample=True)
json.dump(res, open({out!r} + str(env.rank), "w"))
shutdown()
"""


class LinearStudent(Distiller):
    """A tiny real model: linear-probe logits and a second, different 'sampled' head."""

    def __init__(self):
        super().__init__(nn.Linear(6, 7))
        self.other = nn.Linear(6, 7)

    @torch.no_grad()
    def eval_logits(self, images, autocast, sample=False, **_):
        out = {"": self.student(images)}
        if sample:
            out["sample_"] = self.other(images)
        return out


def eval_fixture(checkpoint=None):
    """The model (from ``checkpoint`` when given) and the same images in every process; rank 0
    gets 13 images, rank 1 gets 7."""
    torch.manual_seed(11)
    model = LinearStudent()
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
    torch.manual_seed(12)
    x, y = torch.randn(20, 6), torch.randint(0, 7, (20,))
    shard = lambda a, b: [(x[i:min(i + 4, b)], y[i:min(i + 4, b)]) for i in range(a, b, 4)]
    return model, [shard(0, 13), shard(13, 20)]


def test_two_process_evaluation_equals_single_process(tmp_path):
    """The same checkpoint scored by two gloo processes and by one.
    Planted: hit counts not all-reduced (n still is); neither reduced; top-5 not reduced."""
    model, shards = eval_fixture()
    with torch.no_grad():
        for p in model.parameters():  # not the seeded init the workers would get anyway
            p.add_(torch.randn(p.shape))
    ckpt = str(tmp_path / "model.pt")
    torch.save(model.state_dict(), ckpt)
    whole = evaluate(model, shards[0] + shards[1], torch.device("cpu"), sample=True)
    alone = evaluate(model, shards[0], torch.device("cpu"), sample=True)
    # the fixture is informative: rank 0's own shard scores differently from the whole set
    for k in ("top1", "top5", "sample_top1", "sample_top5"):
        assert alone[k] != pytest.approx(whole[k]), k
    script = tmp_path / "worker.py"
    out = str(tmp_path / "res")
    script.write_text(_WORKER.format(tests=HERE, out=out, ckpt=ckpt))
    from helpers import run_two_gloo_ranks
    run_two_gloo_ranks(script)
    for r in range(2):
        got = json.load(open(out + str(r)))
        assert got["n"] == 20
        for k in ("top1", "top5", "sample_top1", "sample_top5"):
            assert got[k] == pytest.approx(whole[k], rel=1e-12), (r, k)


# ---------------------------------------------------------------------------------------------
# Beyond the list: survivors of the hand-planted mutants
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [True, False])
def test_evaluate_restores_the_training_mode(mode):
    """Planted: distiller.train(False) after evaluating (the next epoch would train with
    frozen BatchNorm statistics)."""
    model = LinearStudent().train(mode)
    evaluate(model, [(torch.randn(3, 6), torch.tensor([0, 1, 2]))], torch.device("cpu"))
    assert model.training is mode and model.student.training is mode


def test_sampled_logits_average_the_draws_before_classifying():
    """teacher_fc(mean of num_sampling generated features), the draws taken in order from the
    generator. Planted: the sum instead of the mean (the bias is then outweighed)."""
    import contextlib
    g = _small_gendd().eval()
    with torch.no_grad():
        g.teacher_fc.bias.copy_(torch.randn(5) * 5)
    x = torch.randn(3, 3, 32, 32)
    out = g.eval_logits(x, contextlib.nullcontext(), sample=True, cfg=2.0, num_sampling=3,
                        generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        z = g.cls_projector(g.student.forward_features(x))
        feats = [g.diffloss.generate(z, cfg=2.0, generator=gen) for _ in range(3)]
        want = g.teacher_fc(sum(feats) / 3)
    scale = want.abs().amax(1, keepdim=True)
    assert ((out["sample_"] - want).abs() / scale).max() < 1e-4
