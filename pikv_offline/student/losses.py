"""Distillation losses: small pure functions on the valid positions, each returning (sum, count).

The caller divides every sum once by the global count of valid tokens (all ranks, all
micro-batches of the step). Shapes: N valid positions, V student vocabulary, k cached top-k.

KD on the sparse teacher ("bucket" tail). The teacher's tempered log-probs at a grid temperature T
are exact from the cache: with z_i = logprob_i + lse_1 (the T=1 logit up to a constant),
    log p_T(i) = z_i / T - lse_T,        p_T(tail) = 1 - sum_i p_T(i).
The student's k+1 buckets come from its full log-softmax at T gathered at the teacher's ids, with
its tail = 1 - sum. A divergence between the two (k+1)-bucket distributions, times T^2, is the
loss. With k = V the tail is empty and this is the full-vocabulary divergence.

"renorm" instead renormalizes both distributions inside the teacher's top-k (no tail), which is
what most offline-KD tools do; it needs no LSE, so it accepts a T off the grid.
"""

from __future__ import annotations

import math

import torch

# float16 log-prob storage rounds each value by at most 2^-11 relative. A teacher tail mass below
# the resulting uncertainty of sum_i p_i is indistinguishable from zero and is treated as zero,
# so rounding never invents tail mass (it would dominate when k covers the vocabulary).
LOGPROB_REL_ERROR = 2.0 ** -11
_TINY = 1e-30


def _log_tail(log_top: torch.Tensor, floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """log(1 - sum exp(log_top)) per row, with masses <= floor set to _TINY (never -inf: no NaN grads)."""
    mass = -torch.expm1(torch.logsumexp(log_top, dim=-1))
    return torch.log(torch.where(mass > floor, mass, torch.zeros_like(mass)).clamp_min(_TINY))


def divergence(logp: torch.Tensor, logq: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row divergence between distributions given as log-probs [N, m]: teacher p, student q."""
    if kind == "forward_kl":
        return (logp.exp() * (logp - logq)).sum(-1)
    if kind == "reverse_kl":
        return (logq.exp() * (logq - logp)).sum(-1)
    if kind == "jsd":
        logm = torch.logaddexp(logp, logq) - math.log(2.0)
        return 0.5 * (logp.exp() * (logp - logm)).sum(-1) + 0.5 * (logq.exp() * (logq - logm)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def teacher_log_probs(t_logprobs: torch.Tensor, t_lse1: torch.Tensor, t_lseT: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """[N, k] teacher log p_T at the top-k ids from the T=1 log-probs and the stored LSEs."""
    return (t_logprobs + t_lse1[:, None]) / temperature - t_lseT[:, None]


def kd_loss(s_logprobs: torch.Tensor, t_ids: torch.Tensor, t_logprobs: torch.Tensor, t_lse1: torch.Tensor,
            t_lseT: torch.Tensor | None, *, temperature: float = 1.0, kind: str = "forward_kl",
            tail: str = "bucket") -> tuple[torch.Tensor, int]:
    """KD loss sum over N positions and N.

    s_logprobs [N, V] the student's log-softmax at ``temperature`` (float32), t_ids [N, k] int64,
    t_logprobs [N, k] (T=1 log-softmax, sorted), t_lse1 / t_lseT [N] (teacher LSE at T=1 / at
    ``temperature``; t_lseT unused with tail="renorm").
    """
    T = temperature
    s_top = torch.gather(s_logprobs, -1, t_ids)
    if tail == "renorm":
        logp = torch.log_softmax(t_logprobs / T, dim=-1)  # the lse_1 shift cancels in the softmax
        logq = torch.log_softmax(s_top, dim=-1)
    else:
        p_top = teacher_log_probs(t_logprobs, t_lse1, t_lseT, T)
        floor = LOGPROB_REL_ERROR / T * (p_top.exp() * t_logprobs.abs()).sum(-1)
        logp = torch.cat([p_top, _log_tail(p_top, floor)[:, None]], dim=-1)
        logq = torch.cat([s_top, _log_tail(s_top)[:, None]], dim=-1)
    return divergence(logp, logq, kind).sum() * (T * T), s_logprobs.shape[0]


def ce_loss(s_logprobs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy sum over N positions and N. s_logprobs [N, V] log-softmax at T=1, labels [N]."""
    return -torch.gather(s_logprobs, -1, labels[:, None]).sum(), labels.shape[0]
