"""Losses: bucket KD at k = V equals the full-vocabulary divergence; the sampled tail is unbiased for
the full KL and its gradient; chunked == plain; zero at equality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import itertools
import json

import numpy as np

from pikv_offline.cache.format import decode_gaps, decode_logprobs, encode_logprobs, encode_tail
from pikv_offline.student.losses import ce_loss, divergence, kd_loss, kd_rows


def teacher_targets(t_logits: torch.Tensor, k: int, temps=(1.0, 2.0), fp16: bool = False):
    """What the cache stores for these logits: top-k ids, T=1 log-probs (optionally fp16-rounded), tnorm."""
    lp = torch.log_softmax(t_logits, -1)
    top, ids = torch.topk(lp, k, -1)
    if fp16:
        top = torch.from_numpy(decode_logprobs(encode_logprobs(top.numpy())))
    tnorm = torch.stack([torch.logsumexp(lp / t, -1) for t in temps], -1)
    return ids, top, tnorm


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
    got, n = kd_loss(lsm(s_logits, T), ids, top, lse[:, j], temperature=T)
    # The reference: F.kl_div over the full vocabulary with the teacher distribution as stored.
    p_stored = torch.zeros_like(t_logits).scatter(-1, ids, top / T - lse[:, j:j + 1]).exp()
    want = F.kl_div(torch.log_softmax(s_logits / T, -1), p_stored, reduction="sum") * T * T
    assert n == 40
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_other_divergences_at_full_k(logits, kind):
    t_logits, s_logits = logits
    ids, top, lse = teacher_targets(t_logits, 50)
    got, _ = kd_loss(lsm(s_logits), ids, top, lse[:, 0], kind=kind)
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
    got, _ = kd_loss(lsm(s_logits), ids, top, lse[:, 0])
    p, q = torch.softmax(t_logits, -1), torch.softmax(s_logits, -1)
    pk, qk = torch.gather(p, -1, ids), torch.gather(q, -1, ids)
    pb = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    qb = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(got, (pb * (pb.log() - qb.log())).sum(), rtol=1e-5, atol=1e-4)


def test_renorm_is_kl_inside_top_k(logits):
    t_logits, s_logits = logits
    ids, top, lse = teacher_targets(t_logits, 7)
    got, _ = kd_loss(lsm(s_logits, 3.0), ids, top, lse[:, 0], temperature=3.0, tail="renorm")
    p = torch.softmax(torch.gather(t_logits, -1, ids) / 3.0, -1)
    q = torch.softmax(torch.gather(s_logits, -1, ids) / 3.0, -1)
    torch.testing.assert_close(got, (p * (p.log() - q.log())).sum() * 9.0, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_zero_when_student_equals_teacher_and_gradient_points_to_teacher(logits, kind, tail):
    t_logits, s_logits = logits
    ids, top, lse = teacher_targets(t_logits, 8)
    same, _ = kd_loss(lsm(t_logits), ids, top, lse[:, 0], kind=kind, tail=tail)
    assert abs(same.item()) < 1e-4
    s = s_logits.clone().requires_grad_()
    loss, _ = kd_loss(lsm(s), ids, top, lse[:, 0], kind=kind, tail=tail)
    loss.backward()
    with torch.no_grad():  # a small step against the gradient lowers the loss
        lower, _ = kd_loss(lsm(s - 1e-2 * s.grad), ids, top, lse[:, 0], kind=kind, tail=tail)
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
    from pikv_offline.student.data import Batch, TargetPlan
    from pikv_offline.student.distiller import Distiller
    from pikv_offline.tools.toy import make_model

    student = make_model("llama", len(tokenizer), hidden=32, layers=1, context=64, seed=3)
    g = torch.Generator().manual_seed(1)
    b, length, k, v = 3, 20, 6, len(tokenizer)
    input_ids = torch.randint(0, v, (b, length), generator=g)
    loss_mask = torch.rand(b, length, generator=g) > 0.2
    t_logits = torch.randn(b, length, v, generator=g) * 2
    ids, top, lse = teacher_targets(t_logits.reshape(-1, v), k)
    batch = Batch(input_ids=input_ids, loss_mask=loss_mask, sample_id=torch.arange(b), head_ids=ids.reshape(b, length, k),
                  head_logprobs=top.reshape(b, length, k), tnorm=lse[:, 0].reshape(b, length),
                  tail_ids=torch.zeros(b, length, 0, dtype=torch.long), tail_logprobs=torch.zeros(b, length, 0),
                  tail_counts=torch.zeros(b, length, 0), tail_logq=torch.zeros(b, length, 0))
    plan = TargetPlan(top_k=k, temperature=1.0, grid_index=0, tail="bucket", draws=0, rel_error=2.0 ** -11)
    results = []
    for chunk in (0, 7):
        student.zero_grad()
        net = Distiller(student, plan, weights={"kd": 1.0, "ce": 0.5}, loss_chunk=chunk)
        losses, top1, n = net(batch)
        kd, ce = losses["kd"], losses["ce"]
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


def full_kl(t_logits, s_logits, T):
    p, logq = torch.log_softmax(t_logits / T, -1), torch.log_softmax(s_logits / T, -1)
    return (p.exp() * (p - logq)).sum(-1)


@pytest.mark.parametrize("proposal", [(1.0,), (1.0, 2.0, 4.0), (4.0, 1.0, 1.0)])
@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_sampled_tail_is_unbiased_by_exact_enumeration(k, T, proposal):
    """E over every ordered n-tuple of tail draws of the estimator (and of its gradient) == full KL, for
    draws at T=1 alone (format 4), one slot per grid T, and a weighted mixture without slot order."""
    from pikv_offline.cache.format import tail_strata
    from pikv_offline.student.losses import tail_log_proposal

    g = torch.Generator().manual_seed(k)
    v, n = 7, 3
    grid = (1.0, 2.0, 4.0)
    t_logits = torch.randn(v, generator=g, dtype=torch.float64) * 2
    s_logits = (torch.randn(v, generator=g, dtype=torch.float64) * 2).requires_grad_()
    lp = torch.log_softmax(t_logits, -1)
    head = torch.topk(lp, k).indices
    tail = [i for i in range(v) if i not in head.tolist()]

    def r(t):  # the dump's sampling distribution at proposal temperature t: p_t restricted to the tail
        p = torch.softmax(lp[tail] / t, -1)
        return p / p.sum()

    slot_r = [r(proposal[j % len(proposal)]) for j in range(n)]
    draws = np.array(list(itertools.product(tail, repeat=n)))
    prob = torch.stack([torch.prod(torch.stack([slot_r[j][tail.index(i)] for j, i in enumerate(d)])) for d in draws])
    assert abs(prob.sum().item() - 1) < 1e-12
    ids, _, counts = encode_tail(draws, lp.detach().numpy()[draws], "fp16", v)
    ids = torch.from_numpy(decode_gaps(ids))  # stored as gaps
    rows = len(draws)
    tnorms = torch.stack([torch.logsumexp(lp / t, -1) for t in grid])  # exact: tnorm_1 = 0
    tnorm = tnorms[grid.index(T)]
    strata = tail_strata(proposal, n)
    # Exact float64 log-probs at the stored ids (storage rounding is the other test's business).
    logq = tail_log_proposal(lp[head].expand(rows, k), lp[ids],
                             tnorms[[grid.index(t) for t, _ in strata]].expand(rows, -1), strata, n, 0.0)
    est = kd_rows(torch.log_softmax(s_logits / T, -1).expand(rows, v), head.expand(rows, k), lp[head].expand(rows, k),
                  tnorm.expand(rows), temperature=T, tail="sampled", rel_error=0.0, tail_ids=ids, draws=n,
                  tail_logprobs=lp[ids], tail_counts=torch.from_numpy(counts).double(), tail_logq=logq)
    expected = (prob * est).sum()
    want = full_kl(t_logits, s_logits, T)
    torch.testing.assert_close(expected, want, rtol=1e-10, atol=1e-12)
    g_est, = torch.autograd.grad(expected, s_logits)
    g_full, = torch.autograd.grad(want, s_logits)
    torch.testing.assert_close(g_est, g_full, rtol=1e-10, atol=1e-12)
    assert est.std() > 0.01  # a real estimator: single draws differ
    if proposal == (1.0,):  # format 4's weights: the proposal's default
        old = kd_rows(torch.log_softmax(s_logits / T, -1).expand(rows, v), head.expand(rows, k),
                      lp[head].expand(rows, k), tnorm.expand(rows), temperature=T, tail="sampled", rel_error=0.0,
                      tail_ids=ids, draws=n, tail_logprobs=lp[ids], tail_counts=torch.from_numpy(counts).double())
        torch.testing.assert_close(old, est, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("proposal", [(1.0,), (1.0, 2.0)])
def test_sampled_tail_from_the_dump_sampler_averages_to_full_kl(llama_teacher, proposal):
    """Many seeds through the real sampler (logit_targets) and the real storage (encode/decode_tail), with
    draws at T=1 alone and at both grid temperatures."""
    from transformers import AutoModelForCausalLM

    from pikv_offline.cache.format import decode_head, encode_head, tail_strata
    from pikv_offline.student.losses import tail_log_proposal
    from pikv_offline.teacher.model import logit_targets

    model = AutoModelForCausalLM.from_pretrained(llama_teacher).eval()
    seeds, length, k, n, T = 4000, 6, 4, 8, 2.0
    x = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    u = torch.rand(seeds, length, n, generator=torch.Generator().manual_seed(1))
    got = logit_targets(model, x.expand(seeds, length), k, (1.0, T), u, tail_temperatures=proposal)
    v = model.config.vocab_size
    # every draw lies outside the head; the log-probs are the live ones
    assert not (got["tail_ids"][..., :, None] == got["ids"][..., None, :]).any()
    with torch.no_grad():
        live = torch.log_softmax(model(x).logits.float(), -1)[0]
    torch.testing.assert_close(got["tail_logprobs"], torch.gather(live.expand(seeds, -1, -1), -1, got["tail_ids"]),
                               atol=1e-5, rtol=1e-5)
    ids, lps, counts = encode_tail(got["tail_ids"].numpy(), got["tail_logprobs"].numpy(), "fp16", v)
    assert (counts.sum(-1) == n).all()
    h_ids, h_bits = encode_head(got["ids"].numpy(), got["logprobs"].numpy(), "fp16", v)
    h_ids, h_lp = decode_head(h_ids, h_bits, "fp16")
    s_logits = torch.randn(length, v, generator=torch.Generator().manual_seed(2))
    per_seed = s_logits.expand(seeds, -1, -1).clone().requires_grad_()  # one leaf per seed: per-seed gradients
    tail_lp = torch.from_numpy(decode_logprobs(lps)).reshape(-1, n)
    strata = tail_strata(proposal, n)
    logq = tail_log_proposal(torch.from_numpy(h_lp).reshape(-1, k), tail_lp,
                             got["tnorm"][..., [(1.0, T).index(t) for t, _ in strata]].reshape(-1, len(strata)),
                             strata, n, 2.0 ** -11)
    rows = kd_rows(torch.log_softmax(per_seed / T, -1).reshape(-1, v),
                   torch.from_numpy(h_ids).reshape(-1, k), torch.from_numpy(h_lp).reshape(-1, k),
                   got["tnorm"][..., 1].reshape(-1), temperature=T, tail="sampled",
                   tail_ids=torch.from_numpy(decode_gaps(ids)).reshape(-1, n), tail_logprobs=tail_lp,
                   tail_counts=torch.from_numpy(counts).float().reshape(-1, n), tail_logq=logq,
                   draws=n).reshape(seeds, length)
    full = s_logits.clone().requires_grad_()
    want = full_kl(live, full, T)
    mean, se = rows.mean(0), rows.std(0) / seeds ** 0.5
    assert ((mean - want).abs() < 4 * se + 2e-3).all(), (mean, want, se)
    # Gradient: per coordinate, the seeds' mean is within noise of the full gradient (z^2 averages ~1).
    (grads,) = torch.autograd.grad(rows.sum(), per_seed)
    (g_full,) = torch.autograd.grad(want.sum(), full)
    # The fp16-stored head log-probs move p_T(v) by up to p_T(v) 2^-11 |lp(v)| / T, so the gradient
    # (q_T - p_T) / T of a head id by that over T: rounding, the same for every seed (a head id's
    # gradient hardly varies over the seeds, with the tail bucket as control variate), hence the floor.
    rounding = 3 * 2.0 ** -11 * torch.softmax(live / T, -1) * live.abs() / T / T
    se_g = grads.std(0) / seeds ** 0.5 + 1e-7 + rounding
    z2 = ((grads.mean(0) - g_full) / se_g) ** 2
    assert z2.mean() < 1.5 and z2.max() < 40, (z2.mean(), z2.max())


def test_sampled_tail_zero_at_equality_and_descends():
    g = torch.Generator().manual_seed(5)
    v, k, n, rows = 30, 4, 6, 50
    t_logits = torch.randn(rows, v, generator=g) * 2
    lp = torch.log_softmax(t_logits, -1)
    top, ids = torch.topk(lp, k, -1)
    masked = lp.exp().scatter(-1, ids, 0.0)
    draws = torch.multinomial(masked, n, replacement=True, generator=g)
    t_ids, t_lps, counts = encode_tail(draws.numpy(), torch.gather(lp, -1, draws).numpy(), "fp16", v)
    kw = dict(tail="sampled", draws=n, tail_ids=torch.from_numpy(decode_gaps(t_ids)),
              tail_logprobs=torch.from_numpy(decode_logprobs(t_lps)), tail_counts=torch.from_numpy(counts).float())
    same, _ = kd_loss(lp, ids, top, torch.zeros(rows), **kw)
    assert abs(same.item()) < 1e-2 * rows  # fp16 tail log-probs: exact zero only up to rounding
    s = torch.randn(rows, v, generator=g).requires_grad_()
    loss, _ = kd_loss(torch.log_softmax(s, -1), ids, top, torch.zeros(rows), **kw)
    loss.backward()
    with torch.no_grad():
        lower, _ = kd_loss(torch.log_softmax(s - 1e-2 * s.grad, -1), ids, top, torch.zeros(rows), **kw)
    assert lower < loss


def _fused_case(T, seed=0, n=37, d=16, v=300, k=8, draws=5, bias=True):
    """A student head (h, W, b) and cached teacher targets with a sampled tail, as the cache stores them."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(v, d, generator=g) / d ** 0.5).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).requires_grad_() if bias else None
    t_logits = torch.randn(n, v, generator=g) * 3
    ids, top, tnorm = teacher_targets(t_logits, k, temps=(1.0, T) if T != 1 else (1.0,))
    lp = torch.log_softmax(t_logits, -1)
    rest = lp.exp().scatter(1, ids, 0.0)  # the tail distribution the dump draws from
    tail_ids = torch.multinomial(rest, draws, replacement=False, generator=g).sort(-1).values
    tail_lp = lp.gather(1, tail_ids)
    counts = torch.randint(0, 3, (n, draws), generator=g)
    counts[:, 0] += 1
    labels = torch.randint(0, v, (n,), generator=g)
    return h, w, b, labels, ids, top, tnorm[:, -1], tail_ids, tail_lp, counts.float(), int(counts.sum(-1).max())


@pytest.mark.parametrize("tail,kind,T,ce,bias", [
    ("bucket", "forward_kl", 1.0, True, True), ("bucket", "forward_kl", 2.0, True, False),
    ("bucket", "reverse_kl", 2.0, True, True), ("bucket", "jsd", 1.0, False, True), ("bucket", "jsd", 4.0, True, True),
    ("renorm", "forward_kl", 2.0, True, True), ("renorm", "reverse_kl", 1.0, False, False),
    ("sampled", "forward_kl", 1.0, True, True), ("sampled", "forward_kl", 2.0, True, True),
    ("sampled", "forward_kl", 4.0, False, True), ("bucket", "forward_kl", 1.0, False, True)])
def test_fused_head_equals_the_plain_log_softmax(tail, kind, T, ce, bias):
    """fused.fused_kd_ce (chunks of 10 of 37 positions, the gradient computed in the forward pass) gives
    the KD and CE sums and the gradients of h, W and b of the plain [N, V] log-softmax path, for every
    tail, divergence, temperature, with CE on and off."""
    from pikv_offline.student.fused import fused_kd_ce
    from pikv_offline.student.losses import kd_rows_at

    h, w, b, labels, ids, top, tnorm, tail_ids, tail_lp, counts, draws = _fused_case(T, bias=bias)
    kw = dict(temperature=T, kind=kind, tail=tail, rel_error=2.0 ** -11, draws=draws)
    ce_w = 0.7 if ce else 0.0

    z = h @ w.t() + (b if b is not None else 0)
    plain_kd, _ = kd_loss(torch.log_softmax(z / T, -1), ids, top, tnorm, tail_ids=tail_ids, tail_logprobs=tail_lp,
                          tail_counts=counts, **kw)
    plain_ce, _ = ce_loss(torch.log_softmax(z, -1), labels)
    params = [h, w] + ([b] if b is not None else [])
    want = torch.autograd.grad(plain_kd + ce_w * plain_ce, params)

    sampled, k = tail == "sampled", ids.shape[1]

    def loss(s_ids, s_label, top_, tnorm_, tail_lp_, counts_):
        kd = kd_rows_at(s_ids[:, :k], top_, tnorm_, s_tail=s_ids[:, k:] if sampled else None, tail_logprobs=tail_lp_,
                        tail_counts=counts_, **kw).sum() * T * T
        return kd, -s_label.sum()

    all_ids = torch.cat([ids, tail_ids], 1) if sampled else ids
    kd, ce_sum, argmax = fused_kd_ce(h, w, b, all_ids, labels, loss, (top, tnorm, tail_lp, counts), T, (1.0, ce_w),
                                     chunk=10)
    got = torch.autograd.grad(kd + ce_w * ce_sum, params)
    torch.testing.assert_close(kd, plain_kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce_sum, plain_ce, rtol=1e-5, atol=1e-5)
    assert torch.equal(argmax, z.argmax(-1))
    for name, g_got, g_want in zip(("h", "W", "b"), got, want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(RuntimeError, match="loss weights"):  # the gradient is of the weights it was built for
        kd, ce_sum, _ = fused_kd_ce(h, w, b, all_ids, labels, loss, (top, tnorm, tail_lp, counts), T, (1.0, 0.3),
                                    chunk=10)
        torch.autograd.grad(kd + 0.9 * ce_sum, params)


@pytest.mark.parametrize("tail,T", [("bucket", 2.0), ("sampled", 4.0)])
def test_the_distiller_trains_the_same_fused_or_plain(tail, T, train_cache, student_config, llama_teacher, corpus,
                                                      workdir):
    """One step of the Distiller with the fused head equals the plain one (loss and every gradient),
    with CE, the eval top-1 too: at T = 2 with the bucket tail, and at T = 4 with a tail drawn at every
    grid T."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pikv_offline.cache.reader import open_cache
    from pikv_offline.config import DumpConfig
    from pikv_offline.student import data as D
    from pikv_offline.student.distiller import Distiller, fusable
    from pikv_offline.teacher.dump import run as dump

    path = train_cache
    if tail == "sampled":
        path = str(workdir / "fused-sampled")
        dump(DumpConfig(teacher=llama_teacher, data=corpus, out=path, seq_len=32, top_k=4, sampled_tail=9,
                        shard_seqs=8, max_sequences=8))
    cache = open_cache(path)
    plan = D.plan_targets(cache, None, T, tail)
    assert tail == "bucket" or plan.proposal == ((0, 1.0, 3), (1, 2.0, 3), (2, 4.0, 3))
    batch = D.to_batch(D.read_rows(cache, np.arange(8)), cache.encoding, plan)
    spec = json.load(open(student_config))
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec))
    assert fusable(student)
    out = {}
    for fused in (False, True):
        dist = Distiller(student, plan, weights={"kd": 1.0, "ce": 0.5}, fused=fused, loss_chunk=100)
        student.zero_grad()
        losses, _, n = dist(batch)
        (losses["kd"] + 0.5 * losses["ce"]).backward()
        dist.eval()
        with torch.no_grad():
            _, top1, _ = dist(batch)
        out[fused] = (losses["kd"].item(), losses["ce"].item(), int(top1),
                      {k: p.grad.clone() for k, p in student.named_parameters()})
    assert out[True][:3] == pytest.approx(out[False][:3], rel=1e-5)
    for k in out[True][3]:
        scale = max(1.0, out[False][3][k].abs().max().item())  # float32 sums of terms up to that size
        torch.testing.assert_close(out[True][3][k], out[False][3][k], rtol=1e-4, atol=1e-6 * scale, msg=k)
