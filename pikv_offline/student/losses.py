"""Distillation losses: small pure functions on the valid positions, each returning (sum, count).

The caller divides every sum once by the global count of valid tokens (all ranks, all
micro-batches of the step). Shapes: N valid positions, V student vocabulary, k cached top-k
(the "head"), n sampled tail draws per position.

The teacher at a grid temperature T, exactly from the cache: with lp = log p_1 (the stored T=1
log-softmax) and tnorm_T = log sum_v p_1(v)^(1/T) over the full vocabulary (stored per T),
    log p_T(v) = lp(v) / T - tnorm_T.

"bucket": k + 1 buckets, the head ids and one tail holding 1 - sum_head p_T. The student's buckets
come from its full log-softmax at T gathered at the head ids, tail = 1 - sum. A divergence between
the two (k+1)-bucket distributions, times T^2, is the loss; with k = V it is the full-vocabulary one.

"renorm": both distributions renormalized inside the head (no tail), what most offline-KD tools
do; it needs no tnorm, so it accepts a T off the grid.

"sampled": an unbiased estimate of the full-vocabulary forward KL and of its gradient. Split the
vocabulary into the head H and the tail:
    KL(p_T || q_T) = sum_{v in H} p_T(v) f(v) + sum_{v not in H} p_T(v) f(v),   f = log p_T - log q_T.
The head term is exact. The dump drew n ids v_1..v_n with replacement, slot j from the tail of the
teacher at the proposal temperature T_(j) (format: tail_temperatures, cycled over the slots),
    r_c(v) = p_{T_c}(v) / P_c     (v not in H; P_c = 1 - sum_H p_{T_c}, the tail mass at T_c),
so n_c of the n slots come from r_c. With the mixture rbar(v) = sum_c (n_c / n) r_c(v) (the balance
heuristic of multiple importance sampling, Veach & Guibas 1995), for any g
    E[ (1/n) sum_j p_T(v_j) / rbar(v_j) * g(v_j) ] = sum_c (n_c / n) sum_v r_c(v) p_T(v) g(v) / rbar(v)
                                                  = sum_{v not in H} p_T(v) g(v),
so (1/n) sum_j w_j f(v_j) with w_j = p_T(v_j) / rbar(v_j) is unbiased for the tail term at every grid
T, from stored values only (p_{T_c} from lp and tnorm, P_c from the head). The weight depends on an id
alone, not on its slot, so duplicate draws are stored once with their count c, which enters as c/n.
With the one proposal T_c = 1 (format version 4's draws), w_j = P_1 p_T(v_j) / p_1(v_j) (at T = 1,
w_j = P_1). A proposal that covers the grid keeps p_T / rbar <= (n / n_c) P_c at T = T_c, where T=1
draws alone reweighted to T = 4 put huge weights on rare ids. The student's q_T enters linearly
through -log q_T, so the same weights make the gradient unbiased too.
The gradient has a control variate: the student's own tail. With P_T = 1 - sum_H p_T (exact, from
the head), Q_T the student's tail mass and rho(v) = (P_T / Q_T) q_T(v) / p_T(v) (held constant),
    E[ (1/n) sum_j w_j rho(v_j) grad(-log q_T(v_j)) ] = (P_T / Q_T) sum_{v not in H} q_T(v) grad(-log q_T(v))
                                                     = -(P_T / Q_T) grad Q_T = grad[P_T log(P_T / Q_T)],
the gradient of the tail bucket's term, known without draws. So
    grad(head) + grad[P_T log(P_T / Q_T)] + (1/n) sum_j w_j (1 - rho(v_j)) grad(-log q_T(v_j))
is unbiased for the full gradient, and where the student's tail is already proportional to the
teacher's (rho = 1) the draws add no noise: they correct only the tail's shape. The loss value stays
the plain estimate above (also unbiased); kd_rows_at returns it with this gradient. With an empty
head (k = 0) there is no control variate: P_T = Q_T = 1 tells nothing, and far from the teacher
rho only adds noise. Measured on the demo teacher: README, "Fidelity per byte".
It is forward KL
only: reverse KL and JSD need p_T at every id the student puts mass on.
"""

from __future__ import annotations

import math

import torch

_TINY = 1e-30


def _log_tail(log_top: torch.Tensor, floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """log(1 - sum exp(log_top)) per row, with masses <= floor set to _TINY (never -inf: no NaN grads)."""
    return torch.log(tail_mass(log_top, floor).clamp_min(_TINY))


def tail_mass(log_top: torch.Tensor, floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """1 - sum exp(log_top) per row; 0 where it is <= floor (an empty head gives 1)."""
    mass = -torch.expm1(torch.logsumexp(log_top, dim=-1))
    return torch.where(mass > floor, mass, torch.zeros_like(mass))


def rounding_floor(p_top: torch.Tensor, t_logprobs: torch.Tensor, rel_error: float, temperature: float) -> torch.Tensor:
    """The uncertainty of sum_head p_T (p_top = log p_T of the head) left by rounding each stored
    log-prob by ``rel_error`` relative: log p_T moves by at most rel_error * |lp| / T. A teacher tail
    mass below it is indistinguishable from zero and counts as zero, so rounding never invents
    tail mass (it would dominate when k covers the vocabulary)."""
    return rel_error / temperature * (p_top.exp() * t_logprobs.abs()).sum(-1)


def tail_log_proposal(t_logprobs: torch.Tensor, tail_logprobs: torch.Tensor, tnorms: torch.Tensor,
                      proposal: tuple, draws: int, rel_error: float) -> torch.Tensor:
    """[N, n] log rbar(v) of each stored tail id: the density the dump drew it from (module docstring).

    t_logprobs [N, k] the head and tail_logprobs [N, n] (T=1 log-probs); ``proposal`` ((T_c, n_c), ...)
    the distinct proposal temperatures and their slots (format.tail_strata), tnorms [N, len(proposal)]
    tnorm at each T_c. A T_c whose tail mass is below the head's rounding floor (indistinguishable from
    zero) is left out of the mixture; where every one is, the result is -inf and the weights are 0."""
    terms = []
    for j, (t, n_c) in enumerate(proposal):
        p_top = teacher_log_probs(t_logprobs, tnorms[:, j], t)
        mass = tail_mass(p_top, rounding_floor(p_top, t_logprobs, rel_error, t))
        log_r = teacher_log_probs(tail_logprobs, tnorms[:, j], t) - torch.log(mass.clamp_min(_TINY))[:, None]
        terms.append(torch.where(mass[:, None] > 0, log_r + math.log(n_c / draws), torch.full_like(log_r, -math.inf)))
    return terms[0] if len(terms) == 1 else torch.logsumexp(torch.stack(terms), dim=0)


def tail_weights(tail_logprobs: torch.Tensor, tail_counts: torch.Tensor, tail_logq: torch.Tensor,
                 t_tnorm: torch.Tensor, temperature: float, draws: int) -> torch.Tensor:
    """[N, n] importance weights of the sampled tail at T, counts included: (c_j / n) p_T(v_j) / rbar(v_j),
    tail_logq = log rbar (tail_log_proposal). Their row sum estimates the tail mass at T."""
    p_tail = teacher_log_probs(tail_logprobs, t_tnorm, temperature)
    w = tail_counts / draws * torch.exp(p_tail - tail_logq)
    return torch.where(torch.isfinite(tail_logq), w, torch.zeros_like(w))


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


def teacher_log_probs(logprobs1: torch.Tensor, tnorm: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, m] teacher log p_T from the stored T=1 log-probs [N, m] and tnorm_T [N]."""
    return logprobs1 / temperature - tnorm[:, None]


def kd_rows(s_logprobs: torch.Tensor, t_ids: torch.Tensor, t_logprobs: torch.Tensor, t_tnorm: torch.Tensor, *,
            tail_ids: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """[N] per-position divergence (before the T^2 factor).

    s_logprobs [N, V] the student's log-softmax at ``temperature`` (float32); t_ids [N, k] int64 and
    t_logprobs [N, k] the head (T=1 log-probs, any order); t_tnorm [N] tnorm at ``temperature``
    (unused by renorm); rel_error the stored log-probs' relative rounding error. tail="sampled" also
    takes tail_ids / tail_logprobs / tail_counts [N, n] (count 0 = empty slot) of ``draws`` draws and
    their proposal density tail_logq [N, n] (tail_log_proposal; None: the T=1 proposal alone).
    The student enters only at the head and tail ids: kd_rows_at takes those (fused.py computes them
    without the [N, V] log-softmax).
    """
    s_tail = torch.gather(s_logprobs, -1, tail_ids) if kw.get("tail") == "sampled" else None
    return kd_rows_at(torch.gather(s_logprobs, -1, t_ids), t_logprobs, t_tnorm, s_tail=s_tail, **kw)


def kd_rows_at(s_top: torch.Tensor, t_logprobs: torch.Tensor, t_tnorm: torch.Tensor, *, temperature: float = 1.0,
               kind: str = "forward_kl", tail: str = "bucket", rel_error: float = 2.0 ** -11,
               s_tail: torch.Tensor | None = None, tail_logprobs: torch.Tensor | None = None,
               tail_counts: torch.Tensor | None = None, tail_logq: torch.Tensor | None = None,
               draws: int = 0) -> torch.Tensor:
    """kd_rows from the student's log-softmax at T gathered at the head ids (s_top [N, k]) and, for the
    sampled tail, at the tail ids (s_tail [N, n]). tail_logq [N, n] is the proposal density of each
    tail id (tail_log_proposal); None means format 4's T=1 proposal."""
    T = temperature
    if tail == "renorm":
        logp = torch.log_softmax(t_logprobs / T, dim=-1)  # tnorm cancels in the softmax
        return divergence(logp, torch.log_softmax(s_top, dim=-1), kind)
    p_top = teacher_log_probs(t_logprobs, t_tnorm, T)
    if tail == "bucket":
        logp = torch.cat([p_top, _log_tail(p_top, rounding_floor(p_top, t_logprobs, rel_error, T))[:, None]], dim=-1)
        logq = torch.cat([s_top, _log_tail(s_top)[:, None]], dim=-1)
        return divergence(logp, logq, kind)
    if tail != "sampled":
        raise ValueError(f"unknown tail {tail!r}")
    if kind != "forward_kl":
        raise ValueError("the sampled tail estimates forward KL only")
    head = (p_top.exp() * (p_top - s_top)).sum(-1)
    p_tail = teacher_log_probs(tail_logprobs, t_tnorm, T)
    if tail_logq is None:
        tail_logq = tail_log_proposal(t_logprobs, tail_logprobs, torch.zeros_like(t_tnorm)[:, None], ((1.0, draws),),
                                      draws, rel_error)
    w = tail_weights(tail_logprobs, tail_counts, tail_logq, t_tnorm, T, draws)
    value = head + (w * (p_tail - s_tail)).sum(-1)
    if s_top.shape[-1] == 0:
        # No head: nothing is known of the tail exactly (P_T = Q_T = 1), and the control variate would
        # only add the draws' noise while the student is far from the teacher (measured: a fresh
        # student's KD fell more slowly with it).
        return value
    # The gradient with the student's own tail as a control variate (module docstring); none where the
    # teacher's tail mass is indistinguishable from 0.
    mass = tail_mass(p_top, rounding_floor(p_top, t_logprobs, rel_error, T))
    c = torch.where(mass > 0, torch.log(mass.clamp_min(_TINY)) - _log_tail(s_top), torch.zeros_like(mass))
    # w * rho = (c_j / n) (P_T / Q_T) q_T / rbar: from the log-densities directly, so a p_T that
    # underflows at a drawn id cannot turn w * rho into 0 * inf.
    w_rho = tail_counts / draws * torch.exp(c[:, None] + s_tail - tail_logq)
    w_rho = torch.where((mass[:, None] > 0) & torch.isfinite(tail_logq), w_rho, torch.zeros_like(w_rho)).detach()
    surrogate = head + mass * c - ((w - w_rho) * s_tail).sum(-1)
    return value.detach() + (surrogate - surrogate.detach())


def mixture_gap(heads: list, weights: tuple[float, ...], floors: list | None = None,
                chunk_elems: int = 1 << 24) -> torch.Tensor:
    """[N] the generalized Jensen-Shannon divergence J = sum_j w_j KL(p_j || M) of teachers p_j and their
    mixture M = sum_j w_j p_j, on the partition the cache knows exactly for every teacher: each id in every
    teacher's head, and one bucket of the rest. ``heads``: (ids [N, k_j], log p_T [N, k_j]) per teacher;
    ``floors`` [N] per teacher (rounding_floor): a rest mass at or below it counts as 0, as the bucket does.

    Forward KL to the mixture splits as KL(M || q) = sum_j w_j KL(p_j || q) - J (expand M log M), and J does
    not depend on the student: the weighted per-teacher losses carry the mixture's whole gradient, and
    subtracting J gives its value. At k = V the partition is the vocabulary and the value is exact; below,
    this J is a lower bound of the full one (coarsening lowers a KL), so the value stays >= the coarse
    KL(M || q) >= 0 with a bucket tail."""
    ids0, lp0 = heads[0]
    n, k0 = ids0.shape
    if k0 == 0:
        return torch.zeros(n, dtype=torch.float32, device=ids0.device)
    out = []
    step = max(1, chunk_elems // max(1, k0 * max(ids.shape[1] for ids, _ in heads)))
    for s in range(0, n, step):
        known = torch.ones_like(ids0[s:s + step], dtype=torch.bool)  # ids of teacher 0 in every head
        probs = [lp0[s:s + step].float().exp()]
        for ids, lp in heads[1:]:
            match = ids0[s:s + step, :, None] == ids[s:s + step, None, :]
            known &= match.any(-1)
            probs.append((match * lp[s:s + step].float().exp()[:, None, :]).sum(-1))
        p = torch.stack([torch.where(known, q, torch.zeros_like(q)) for q in probs])  # [m, c, k0]
        rest = (1 - p.sum(-1)).clamp_min(0)  # [m, c]: each teacher's mass off the common ids
        if floors is not None:
            f = torch.stack([x[s:s + step] for x in floors])
            rest = torch.where(rest > f, rest, torch.zeros_like(rest))
        w = torch.tensor(weights, dtype=torch.float32, device=p.device)
        mix, mix_rest = (w[:, None, None] * p).sum(0), (w[:, None] * rest).sum(0)
        kl = torch.xlogy(p, p).sub(torch.xlogy(p, mix.expand_as(p))).sum(-1) \
            + torch.xlogy(rest, rest) - torch.xlogy(rest, mix_rest.expand_as(rest))
        out.append((w[:, None] * kl).sum(0).clamp_min(0))
    return torch.cat(out)


def kd_loss(s_logprobs: torch.Tensor, t_ids: torch.Tensor, t_logprobs: torch.Tensor, t_tnorm: torch.Tensor,
            **kw) -> tuple[torch.Tensor, int]:
    """KD loss sum over the N positions (times T^2) and N; arguments as kd_rows."""
    T = kw.get("temperature", 1.0)
    return kd_rows(s_logprobs, t_ids, t_logprobs, t_tnorm, **kw).sum() * (T * T), s_logprobs.shape[0]


def ce_loss(s_logprobs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy sum over N positions and N. s_logprobs [N, V] log-softmax at T=1, labels [N]."""
    return -torch.gather(s_logprobs, -1, labels[:, None]).sum(), labels.shape[0]


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> tuple[torch.Tensor, int]:
    """Hidden-state / KV / expert-output matching on N positions: student [N, G, d] (already projected to
    the teacher's width) against teacher [N, G, d], G groups (KV heads; 1 for hidden states).

    Per position, the mean over groups of the mean squared error over d ("mse") or of 1 - cosine
    similarity ("cosine", blind to scale, so a student of other norms is not pushed to copy them).
    """
    s, t = student.float(), teacher.float()
    if kind == "mse":
        per = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        per = 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"unknown feature loss {kind!r}")
    return per.mean(-1).sum(), s.shape[0]


def router_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """KL(teacher router || student router) per position over the E experts, summed: [N, E] logits each."""
    p = torch.log_softmax(teacher_logits.float(), -1)
    q = torch.log_softmax(student_logits.float(), -1)
    return (p.exp() * (p - q)).sum(), student_logits.shape[0]
