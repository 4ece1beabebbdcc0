"""Baseline distillation losses: Hinton KD and Decoupled KD (Zhao et al., CVPR 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits, teacher_logits, T: float):
    """T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


def dkd_loss(student_logits, teacher_logits, target, alpha: float, beta: float, T: float):
    """alpha * TCKD + beta * NCKD.

    TCKD: KL between the binary (target, not-target) distributions of teacher and student.
    NCKD: KL between the distributions over the non-target classes only (target masked out).
    Both at temperature T, scaled by T^2 and averaged over the batch.
    """
    s, t = student_logits.float() / T, teacher_logits.float() / T
    gt = F.one_hot(target, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, dim=1), F.softmax(t, dim=1)
    # binary distributions [p(target), p(not target)]
    b_s = torch.stack([p_s[gt], p_s.masked_fill(gt, 0).sum(1)], dim=1)
    b_t = torch.stack([p_t[gt], p_t.masked_fill(gt, 0).sum(1)], dim=1)
    tckd = (b_t * (torch.log(b_t.clamp_min(1e-12)) - torch.log(b_s.clamp_min(1e-12)))).sum(1)
    # distributions over the other classes: the target logit is pushed to -inf
    big = torch.finfo(torch.float32).max / 4
    log_q_s = F.log_softmax(s.masked_fill(gt, -big), dim=1)
    log_q_t = F.log_softmax(t.masked_fill(gt, -big), dim=1)
    q_t = log_q_t.exp()
    nckd = (q_t * (log_q_t - log_q_s)).masked_fill(gt, 0).sum(1)
    return (alpha * tckd.mean() + beta * nckd.mean()) * T * T


def ikl_loss(student_logits, teacher_logits, weights, alpha: float, beta: float, T: float):
    """Improved KL (IKL) divergence loss (Cui et al., "Decoupled Kullback-Leibler Divergence
    Loss", NeurIPS 2024), averaged over the batch:

        beta * 1/4 * sum_{j,k} w_j w_k ((t_j - t_k) - (s_j - s_k))^2          (weighted MSE)
      + alpha * sum_j -softmax(t / T)_j * log softmax(s / T)_j               (soft-label CE)

    ``weights`` (B, K) is the per-sample class weighting w: the class-wise mean teacher
    probability of the sample's class (IKL's global information) or the sample's own teacher
    probability. The pairwise sum is never materialised (a (B, K, K) tensor is 256 MB per 64
    images at K = 1000): with d = t - s, S = sum_j w_j and m = sum_j w_j d_j / S,
    sum_{j,k} w_j w_k (d_j - d_k)^2 = 2 S sum_j w_j (d_j - m)^2, a centred (cancellation-free)
    weighted variance.
    """
    s, t, w = student_logits.float(), teacher_logits.float(), weights.float()
    d = t - s
    mass = w.sum(1, keepdim=True)
    mean = (w * d).sum(1, keepdim=True) / mass.clamp_min(1e-30)
    pair = 2.0 * mass.squeeze(1) * (w * (d - mean) ** 2).sum(1)
    wmse = 0.25 * pair.mean()
    sce = -(F.softmax(t / T, dim=1) * F.log_softmax(s / T, dim=1)).sum(1).mean()
    return beta * wmse + alpha * sce, wmse, sce
