"""Losses: bucket KD at k = V equals the full-vocabulary divergence; chunked == plain; zero at equality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pikv_offline.cache.format import decode_logprobs, encode_logprobs
from pikv_offline.student.losses import ce_loss, divergence, kd_loss


def teacher_targets(t_logits: torch.Tensor, k: int, temps=(1.0, 2.0), fp16: bool = False):
    """What the cache stores for these logits: top-k ids, T=1 log-probs (optionally fp16-rounded), LSEs."""
    lp = torch.log_softmax(t_logits, -1)
    top, ids = torch.topk(lp, k, -1)
    if fp16:
        top = torch.from_numpy(decode_logprobs(encode_logprobs(top.numpy())))
    lse = torch.stack([torch.logsumexp(t_logits / t, -1) for t in temps], -1)
    return ids, top, lse


def lsm(logits, T=1.0):
    return torch.log_softmax(logits / T, -1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 50, generator=g) * 3, torch.randn(40, 50, generator=g) * 3


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("fp16", [False, True])
def test_bucket_kd_at_full_k_equals_kl_div(logits, T, fp16):
    t_logits, s_logits = logits
    ids, top, lse = teacher_targets(t_logits, 50, fp16=fp16)
    j = 0 if T == 1.0 else 1
    got, n = kd_loss(lsm(s_logits, T), ids, top, lse[:, 0], lse[:, j], temperature=T)
    # The reference: F.kl_div over the full vocabulary with the teacher distribution as stored.
    p_stored = torch.zeros_like(t_logits).scatter(-1, ids, (top + lse[:, :1]) / T - lse[:, j:j + 1]).exp()
    want = F.kl_div(torch.log_softmax(s_logits / T, -1), p_stored, reduction="sum") * T * T
    assert n == 40
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_other_divergences_at_full_k(logits, kind):
    t_logits, s_logits = logits
    ids, top, lse = teacher_targets(t_logits, 50)
    got, _ = kd_loss(lsm(s_logits), ids, top, lse[:, 0], lse[:, 0], kind=kind)
    p, q = torch.softmax(t_logits, -1), torch.softmax(s_logits, -1)
    if kind == "reverse_kl":
        want = (q * (q.log() - p.log())).sum()
    else:
        m = (p + q) / 2
        want = 0.5 * (p * (p.log() - m.log())).sum() + 0.5 * (q * (q.log() - m.log())).sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_bucket_tail_is_the_mass_outside_top_k(logits):
    t_logits, s_logits = logits
    k = 5
    ids, top, lse = teacher_targets(t_logits, k)
    got, _ = kd_loss(lsm(s_logits), ids, top, lse[:, 0], lse[:, 0])
    p, q = torch.softmax(t_logits, -1), torch.softmax(s_logits, -1)
    pk, qk = torch.gather(p, -1, ids), torch.gather(q, -1, ids)
    pb = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    qb = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(got, (pb * (pb.log() - qb.log())).sum(), rtol=1e-5, atol=1e-4)


def test_renorm_is_kl_inside_top_k(logits):
    t_logits, s_logits = logits
    ids, top, lse = teacher_targets(t_logits, 7)
    got, _ = kd_loss(lsm(s_logits, 3.0), ids, top, lse[:, 0], None, temperature=3.0, tail="renorm")
    p = torch.softmax(torch.gather(t_logits, -1, ids) / 3.0, -1)
    q = torch.softmax(torch.gather(s_logits, -1, ids) / 3.0, -1)
    torch.testing.assert_close(got, (p * (p.log() - q.log())).sum() * 9.0, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_zero_when_student_equals_teacher_and_gradient_points_to_teacher(logits, kind, tail):
    t_logits, s_logits = logits
    ids, top, lse = teacher_targets(t_logits, 8)
    same, _ = kd_loss(lsm(t_logits), ids, top, lse[:, 0], lse[:, 0], kind=kind, tail=tail)
    assert abs(same.item()) < 1e-4
    s = s_logits.clone().requires_grad_()
    loss, _ = kd_loss(lsm(s), ids, top, lse[:, 0], lse[:, 0], kind=kind, tail=tail)
    loss.backward()
    with torch.no_grad():  # a small step against the gradient lowers the loss
        lower, _ = kd_loss(lsm(s - 1e-2 * s.grad), ids, top, lse[:, 0], lse[:, 0], kind=kind, tail=tail)
    assert lower < loss


def test_ce_matches_cross_entropy(logits):
    _, s_logits = logits
    labels = torch.randint(0, 50, (40,))
    got, n = ce_loss(lsm(s_logits), labels)
    torch.testing.assert_close(got / n, F.cross_entropy(s_logits, labels))


def test_divergence_rejects_unknown():
    with pytest.raises(ValueError):
        divergence(torch.zeros(1, 2), torch.zeros(1, 2), "nope")


def test_chunked_loss_equals_plain(tokenizer):
    from pikv_offline.student.train import Distiller
    from pikv_offline.toy import make_model

    student = make_model("llama", len(tokenizer), hidden=32, layers=1, context=64, seed=3)
    g = torch.Generator().manual_seed(1)
    b, length, k, v = 3, 20, 6, len(tokenizer)
    input_ids = torch.randint(0, v, (b, length), generator=g)
    loss_mask = torch.rand(b, length, generator=g) > 0.2
    t_logits = torch.randn(b, length, v, generator=g) * 2
    ids, top, lse = teacher_targets(t_logits.reshape(-1, v), k)
    batch = dict(input_ids=input_ids, loss_mask=loss_mask, t_ids=ids.reshape(b, length, k),
                 t_logprobs=top.reshape(b, length, k), t_lse1=lse[:, 0].reshape(b, length),
                 t_lseT=lse[:, 0].reshape(b, length))
    results = []
    for chunk in (0, 7):
        student.zero_grad()
        net = Distiller(student, temperature=1.0, divergence="forward_kl", tail="bucket", loss_chunk=chunk)
        kd, ce, top1, n = net(**batch)
        (kd + 0.5 * ce).backward()
        results.append((kd.detach(), ce.detach(), int(top1), n,
                        [p.grad.clone() for p in student.parameters()]))
    (kd0, ce0, t0, n0, g0), (kd1, ce1, t1, n1, g1) = results
    assert n0 == n1 == int(loss_mask[:, 1:].sum()) and t0 == t1
    torch.testing.assert_close(kd0, kd1)
    torch.testing.assert_close(ce0, ce1)
    for a, c in zip(g0, g1):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    assert math.isfinite(kd0.item())
