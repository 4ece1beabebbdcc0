"""GenDD's training step and the baseline losses against direct computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from gendd_fast import DiffLoss
from gendd_fast.distill import GenDD, dkd_loss, kd_loss
from gendd_fast.head import draw_row_randomness
from gendd_fast.models import create_model
from helpers import perturb_zero_init
from gendd_fast.distill import DKD
import torch.nn as nn
from helpers import _small_gendd


def test_kd_loss_by_hand():
    s, t, T = torch.randn(5, 7), torch.randn(5, 7), 3.0
    p_t = torch.softmax(t / T, 1)
    want = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    torch.testing.assert_close(kd_loss(s, t, T), want)


def _dkd_by_hand(s, t, y, alpha, beta, T):
    total = 0.0
    for i in range(s.shape[0]):
        ps, pt = torch.softmax(s[i] / T, 0), torch.softmax(t[i] / T, 0)
        bs = torch.stack([ps[y[i]], 1 - ps[y[i]]])
        bt = torch.stack([pt[y[i]], 1 - pt[y[i]]])
        tckd = (bt * (bt.log() - bs.log())).sum()
        others = [j for j in range(s.shape[1]) if j != y[i]]
        qs = torch.softmax(s[i, others] / T, 0)
        qt = torch.softmax(t[i, others] / T, 0)
        nckd = (qt * (qt.log() - qs.log())).sum()
        total = total + alpha * tckd + beta * nckd
    return total / s.shape[0] * T * T


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_loss_by_hand(T):
    s, t, y = torch.randn(6, 9), torch.randn(6, 9) * 2, torch.randint(0, 9, (6,))
    got = dkd_loss(s, t, y, alpha=1.0, beta=8.0, T=T)
    torch.testing.assert_close(got, _dkd_by_hand(s, t, y, 1.0, 8.0, T), rtol=1e-4, atol=1e-5)
    # TCKD and NCKD vanish when the student equals the teacher
    assert dkd_loss(t, t, y, 1.0, 8.0, T).abs() < 1e-5


def make_gendd(d_t=128, d_s=64, **kw):
    student = create_model("resnet8", 10)
    teacher_fc = torch.nn.Linear(d_t, 10)
    args = dict(token_dim=32, width=48, depth=2, sampling_steps="4", mul=3, cond_drop=0.2,
                beta=1.0, smooth=0.9)
    args.update(kw)
    g = GenDD(student, teacher_fc, DiffLoss, **args)
    perturb_zero_init(g.diffloss)
    return g


def test_distribution_contraction():
    g = make_gendd()
    f_t, y = torch.randn(4, 128), torch.tensor([0, 3, 3, 9])
    w = g.teacher_fc.weight
    torch.testing.assert_close(g.contract(f_t, y), 0.1 * f_t + 0.9 * w[y])
    soft = torch.softmax(torch.randn(4, 10), 1)
    torch.testing.assert_close(g.contract(f_t, soft), 0.1 * f_t + 0.9 * soft @ w)
    g.smooth = 0.0
    assert torch.equal(g.contract(f_t, y), f_t)


def test_mixing_is_a_convex_pair_combination():
    g = make_gendd()
    z, tgt = torch.randn(6, 64), torch.randn(6, 128)
    torch.manual_seed(3)
    zm, tm = g.mix(z, tgt)
    # every mixed row is m * row_i + (1 - m) * row_p(i) with one m and one permutation
    torch.manual_seed(3)
    m = float(torch.distributions.Beta(torch.tensor([1.0]), torch.tensor([1.0])).sample())
    perm = torch.randperm(6)
    torch.testing.assert_close(zm, m * z + (1 - m) * z[perm])
    torch.testing.assert_close(tm, m * tgt + (1 - m) * tgt[perm])
    g.beta = 0.0
    assert g.mix(z, tgt)[0] is z


def test_distill_loss_builds_rows_as_the_reference():
    """Split tokenization, block-tiled copies, per-row condition dropout, then the loss."""
    head = perturb_zero_init(DiffLoss(32, 20, 2, 48, "4", 4))
    B, L, d, mul = 3, 4, 32, 2
    target, z = torch.randn(B, L * d), torch.randn(B, 20)
    g1 = torch.Generator().manual_seed(11)
    got = head.distill_loss(target, z, mul, 0.3, generator=g1)
    # by hand
    g2 = torch.Generator().manual_seed(11)
    N = B * L * mul
    keep, t, noise = draw_row_randomness(N, d, 0.3, "cpu", g2)
    rows_x, rows_z, rows_k = [], [], []
    for _ in range(mul):
        for b in range(B):
            for k in range(L):
                rows_x.append(target[b, k * d:(k + 1) * d])
                rows_z.append(z[b])
                rows_k.append(k)
    x0, zz = torch.stack(rows_x), torch.stack(rows_z) * keep[:, None]
    assert 0 < int(keep.sum()) < N  # some rows dropped, not all
    want = head(x0, zz, torch.tensor(rows_k), t=t, noise=noise)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_gendd_step_gradients_reach_student_and_head():
    g = make_gendd()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    t_feat = torch.randn(4, 128)
    loss, parts = g(x, y, (t_feat, None))
    assert set(parts) == {"diff", "ce"} and math.isfinite(loss.item())
    loss.backward()
    assert g.student.layer1[0].conv1.weight.grad.abs().sum() > 0      # through z
    assert g.student.fc.weight.grad.abs().sum() > 0                   # linear probe CE
    assert g.diffloss.net.cond_embed.weight.grad.abs().sum() > 0
    assert g.cls_projector[0].weight.grad.abs().sum() > 0
    assert g.teacher_fc.weight.grad is None                           # frozen


def test_gendd_probe_ce_does_not_train_the_backbone():
    g = make_gendd()
    g.diffloss.requires_grad_(False)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits = g.student.fc(g.student.forward_features(x).detach())
    F.cross_entropy(logits, y).backward()
    assert g.student.layer1[0].conv1.weight.grad is None


def test_state_dict_names_match_the_public_code():
    g = make_gendd()
    keys = set(g.state_dict())
    assert {"cls_projector.0.weight", "cls_projector.0.bias", "teacher_fc.weight",
            "diffloss.net.pos_embed.weight", "diffloss.net.final_layer.linear.weight",
            "diffloss.net.res_blocks.1.adaLN_modulation.1.weight"} <= keys
    assert g.diffloss.net.pos_embed.weight.shape == (4, 48)   # 128 / 32 tokens


def test_sampling_evaluation_shapes():
    import contextlib
    g = make_gendd().eval()
    out = g.eval_logits(torch.randn(3, 3, 32, 32), contextlib.nullcontext(), sample=True,
                        cfg=2.0, num_sampling=2)
    assert out[""].shape == (3, 10) and out["sample_"].shape == (3, 10)
    assert torch.isfinite(out["sample_"]).all()


# Guards from the mutation run (moved from test_mutation_guards.py): each pins a behaviour the rest
# of the suite did not, with inputs where the wrong and right formulas disagree; each docstring
# names the planted bugs it was run against and failed on.


# ---------------------------------------------------------------------------------------------
# DKD warm-up
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("progress,ramp", [(0.0, 0.0), (1.0, 0.05), (5.0, 0.25), (10.0, 0.5),
                                           (19.5, 0.975), (20.0, 1.0), (35.0, 1.0)])
def test_dkd_warmup_weight_at_given_epochs(progress, ramp):
    """loss = ce_weight * CE + min(epoch / warmup, 1) * DKD, at warmup 20.
    Planted: no clamp at 1; ramp by (epoch + 1); warm-up ignored."""
    torch.manual_seed(0)
    student = nn.Linear(5, 6)
    m = DKD(nn.Sequential(student), alpha=1.0, beta=8.0, T=4.0, warmup=20, ce_weight=0.7)
    x, y, t = torch.randn(8, 5), torch.randint(0, 6, (8,)), torch.randn(8, 6) * 3
    loss, parts = m(x, y, (None, t), progress)
    s = student(x)
    ce = nn.functional.cross_entropy(s, y)
    kd = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    assert kd.item() > 0.1  # the warm-up weight is visible in the loss
    want = 0.7 * ce + ramp * kd
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    m0 = DKD(nn.Sequential(student), warmup=0)
    loss0, _ = m0(x, y, (None, t), progress)
    assert loss0.item() == pytest.approx((ce + kd).item(), rel=1e-5)


def test_gendd_step_hands_the_head_the_condition_target_and_drop_rate(monkeypatch):
    """What the GenDD step passes to the head, with mixing off: z = LayerNorm(f_s), the
    contracted target, mul and cond_drop. Planted: cond_drop not passed (0.0); z = f_s;
    contraction weights swapped."""
    g = _small_gendd(beta=0.0)
    seen = {}

    def spy(target, z, mul, cond_drop_prob, generator=None):
        seen.update(target=target, z=z, mul=mul, p=cond_drop_prob)
        return (z.sum() + target.sum()) * 0
    monkeypatch.setattr(g.diffloss, "distill_loss", spy)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 4, 2, 2])
    f_t = torch.randn(4, 64)
    g(x, y, (f_t, None))
    f_s = g.student.forward_features(x)
    z = nn.functional.layer_norm(f_s, (f_s.shape[1],), g.cls_projector[0].weight,
                                 g.cls_projector[0].bias)
    torch.testing.assert_close(seen["z"], z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["target"], 0.3 * f_t + 0.7 * g.teacher_fc.weight[y])
    assert seen["mul"] == 2 and seen["p"] == 0.3


def test_gendd_step_probe_ce_reaches_fc_but_not_the_backbone(monkeypatch):
    """In the full GenDD step the linear probe's CE trains fc on *detached* features: with the
    diffusion term contributing no gradient, the backbone gets none. Planted:
    logits = fc(f_s) without detach (CE then trains the student's backbone)."""
    g = _small_gendd(beta=0.0)
    monkeypatch.setattr(g.diffloss, "distill_loss",
                        lambda target, z, *a, **k: (z.sum() + target.sum()) * 0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 4, 2, 2])
    loss, parts = g(x, y, (torch.randn(4, 64), None))
    assert "ce" in parts
    loss.backward()
    assert g.student.fc.weight.grad.abs().sum() > 0
    for name, p in g.student.named_parameters():
        if not name.startswith("fc."):
            assert p.grad is None or not p.grad.any(), name


# The method registry (gendd_fast/distill/): trainer, validation, evaluation and report ask it.

def test_registry_declares_each_method_and_builds_it_from_a_config():
    """Each method answers needs_teacher / needs_labels / samples and builds from a config.
    Planted: KD declared needs_labels = True (validation then refuses the KL baseline) and GenDD
    without samples = True (no sampling evaluation): both fail the table below."""
    from gendd_fast.config import Config
    from gendd_fast.distill import build_distiller, method, method_names
    assert method_names() == ("ce", "kd", "dkd", "ikl", "gendd-pretrain", "gendd")
    traits = {n: (method(n).needs_teacher, method(n).needs_labels, method(n).samples)
              for n in method_names()}
    assert traits == {"ce": (False, True, False), "kd": (True, False, False),
                      "dkd": (True, True, False), "ikl": (True, False, False),
                      "gendd-pretrain": (True, True, False), "gendd": (True, False, True)}
    teacher, student = create_model("resnet8", 4), create_model("resnet8", 4)
    for name in method_names():
        d = build_distiller(Config(method=name, token_dim=32, diffloss_w=16, diffloss_d=1),
                            student, teacher, DiffLoss)
        assert type(d) is method(name) and d.name == name
        assert (d.head is not None) == method(name).samples
    with pytest.raises(ValueError, match="method 'kd' needs a teacher"):
        build_distiller(Config(method="kd"), student, None)
    with pytest.raises(ValueError, match="unknown method 'nope'; choose from ce, kd"):
        method("nope")


def test_a_new_method_is_one_class_and_one_registration():
    """A method registered from outside the package (what a new file under distill/ does) is
    accepted by the config's validation and built by build_distiller, with its declared needs
    enforced; nothing else names it."""
    from gendd_fast.config import Config, validate
    from gendd_fast.distill import Distiller, base, build_distiller, register

    @register("test-l2")
    class L2(Distiller):
        needs_teacher = True
        needs_labels = False

        @classmethod
        def from_config(cls, cfg, student, teacher, head_cls=None):
            return cls(student)

        def forward(self, images, labels, teacher_out, progress=0.0):
            loss = (self.student(images) - teacher_out[1]).pow(2).mean()
            return loss, {"l2": loss.detach()}

    try:
        cfg = Config(method="test-l2", teacher="resnet8", labels=False)
        validate(cfg)
        with pytest.raises(ValueError, match="method 'test-l2' needs a teacher"):
            validate(Config(method="test-l2", teacher=""))
        d = build_distiller(cfg, create_model("resnet8", 4), create_model("resnet8", 4))
        x = torch.randn(2, 3, 32, 32)
        loss, parts = d(x, None, (None, torch.zeros(2, 4)))
        assert loss.item() >= 0 and set(parts) == {"l2"}
    finally:
        base._METHODS.pop("test-l2")


# -- the rules the planted bugs of issue 22 broke ---------------------------------------------
class _LinearStudent(torch.nn.Module):
    """A student that is one fixed linear map: its logits are known without running a CNN."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, x):
        return x @ self.w


def test_kd_total_is_alpha_ce_plus_one_minus_alpha_t2_kl():
    """KD's total is alpha * CE(s, y) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)),
    computed here element by element in float64 (alpha 0.3, so swapping the weights changes it).
    Planted: alpha applied to the KD term instead of CE (weights swapped) -> fails."""
    from gendd_fast.distill import KD
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g)
    t_logits, y = torch.randn(6, 5, generator=g) * 2, torch.tensor([0, 1, 4, 2, 2, 3])
    alpha, T = 0.3, 2.0
    loss, parts = KD(_LinearStudent(w), T=T, alpha=alpha)(x, y, (None, t_logits))
    s = (x @ w).double()
    t = t_logits.double()
    ce = kl = 0.0
    for i in range(6):
        ce = ce - (s[i, y[i]] - torch.logsumexp(s[i], 0))
        p_t = torch.exp(t[i] / T - torch.logsumexp(t[i] / T, 0))
        log_p_s = s[i] / T - torch.logsumexp(s[i] / T, 0)
        kl = kl + (p_t * (torch.log(p_t) - log_p_s)).sum()
    ce, kl = ce / 6, kl / 6
    want = alpha * ce + (1 - alpha) * T * T * kl
    assert abs(float(ce) - float(T * T * kl)) > 0.1   # the swap would show
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["ce"].double(), ce, rtol=1e-5, atol=1e-6)


def _mixing_weights(g, draws):
    """The m of each mix() call, read off one-hot conditions: row i becomes
    m e_i + (1 - m) e_p(i), so a moved row's off-diagonal entry is 1 - m."""
    eye = torch.eye(4)
    ms = []
    for _ in range(draws):
        zm, _ = g.mix(eye, eye)
        off = zm - torch.diag(torch.diag(zm))
        if off.abs().max() > 0:   # p is not the identity
            ms.append(1.0 - float(off.max()))
    return torch.tensor(ms, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.4, 3.0])
def test_mixing_weight_is_beta_beta_distributed(beta):
    """m ~ Beta(beta, beta): mean 1/2 and variance 1 / (4 (2 beta + 1)) over many draws (at
    beta != 1, Beta(beta, 1) has mean beta / (beta + 1) and another variance).
    Planted: m drawn from Beta(beta, 1) -> fails."""
    g = make_gendd(beta=beta)
    torch.manual_seed(1)
    m = _mixing_weights(g, 3000)
    assert len(m) > 2500
    want_var = 1.0 / (4 * (2 * beta + 1))
    assert abs(float(m.mean()) - 0.5) < 4 * math.sqrt(want_var / len(m)) + 1e-3
    assert float(m.var()) == pytest.approx(want_var, rel=0.12)
    assert 0.0 <= float(m.min()) and float(m.max()) <= 1.0


def test_condition_is_the_affine_layernorm_of_the_student_feature(monkeypatch):
    """The head's condition is z = LayerNorm(f_s) over D_s with the default eps and the
    projector's own affine parameters (cls_projector.0), written out here by hand.
    Planted: the condition LayerNorm bypassed (z = f_s) -> fails."""
    g = make_gendd(beta=0.0)
    with torch.no_grad():
        g.cls_projector[0].weight.copy_(torch.linspace(0.5, 2.0, 64))
        g.cls_projector[0].bias.copy_(torch.linspace(-1.0, 1.0, 64))
    seen = {}

    def capture(target, z, mul, cond_drop, **kw):
        seen["z"] = z
        return z.sum() * 0 + target.sum() * 0

    monkeypatch.setattr(g.diffloss, "distill_loss", capture)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    g(x, y, (torch.randn(3, 128), None))
    f_s = g.student.forward_features(x)
    mu = f_s.mean(1, keepdim=True)
    var = ((f_s - mu) ** 2).mean(1, keepdim=True)
    want = (f_s - mu) / torch.sqrt(var + 1e-5) * g.cls_projector[0].weight \
        + g.cls_projector[0].bias
    torch.testing.assert_close(seen["z"], want, rtol=1e-4, atol=1e-5)
