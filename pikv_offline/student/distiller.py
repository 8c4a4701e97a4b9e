"""The trained module of stage two: the student, the rich losses' projections, and the losses.

    Distiller(student, plan, weights=cfg.loss_weights(), pairs=resolve_pairs(...))(batch) -> sums

DDP wraps the Distiller, so the whole forward, loss and projections included, goes through DDP and
the optimizer sees the projections. Only ``student`` is exported; the projections go to the
checkpoint. A projection maps the student's width to the teacher's; it starts as the identity when
the widths agree (a student made from the teacher's layers starts at zero loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cache import format as F
from ..config import parse_layer_map, weight_field
from ..errors import PikvError
from ..modeling import (Capture, hidden_width, kv_shape, layer_count, lm_logits, moe_layers, router_experts,
                        text_config)
from .data import Batch, TargetPlan
from .fused import fused_kd_ce
from .xtok import matched_kd_loss, matched_kd_rows, uld_loss
from .losses import (ce_loss, feature_loss, kd_loss, kd_rows_at, mixture_gap, rounding_floor, router_loss,
                     teacher_log_probs)

N_TARGETS = 7  # a teacher's tensors per position: head ids, head log-probs, tnorm, tail ids, log-probs, counts, logq


@dataclass(frozen=True)
class Pair:
    """One rich loss term: the cache's ``kind`` target of teacher layer ``t`` against student layer ``s``."""
    kind: str
    t: int
    s: int

    @property
    def key(self) -> str:  # ModuleDict keys may not hold dots or slashes
        return f"{self.kind}_{self.t}_{self.s}"


def _projection(d_in: int, d_out: int) -> torch.nn.Linear:
    proj = torch.nn.Linear(d_in, d_out, bias=False)
    if d_in == d_out:
        torch.nn.init.eye_(proj.weight)
    return proj


class Distiller(torch.nn.Module):
    """forward(batch) -> ({kd, ce, and each rich kind with pairs}: sums over the valid predictions,
    top-1 hits, count). ``weights`` (loss name -> weight) keeps a loss of weight 0 out of the graph;
    ``targets`` is the cache's targets attribute (the rich targets' shapes).

    Several teachers (``others``: the TargetPlan of each further cache, ``teacher_weights`` w_j of all):
    the KD target is the mixture M = sum_j w_j p_j. Forward KL to it is sum_j w_j KL(p_j || q) - J with J
    (losses.mixture_gap) free of the student, so the loss is each teacher's own loss (its tail mode:
    bucket, or its sampled tail reweighted by its own proposal), weighted, minus J: the mixture's gradient
    exactly (in expectation, sampled) and, at k = V, its value exactly. Top-1 is against the first."""

    def __init__(self, student, plan: TargetPlan, *, weights: dict[str, float], loss_chunk: int = 0,
                 divergence: str = "forward_kl", pairs: tuple[Pair, ...] = (), targets: dict | None = None,
                 feature_loss: str = "mse", fused: bool = True, others: tuple = (),
                 teacher_weights: tuple[float, ...] | None = None, cross: str | None = None):
        super().__init__()
        self.cross = cross  # cross-tokenizer KD at the aligned positions: "match" or "uld" (xtok.py), or None
        self.student, self.plan, self.divergence, self.loss_chunk = student, plan, divergence, loss_chunk
        self.plans = (plan, *others)
        self.teacher_weights = tuple(teacher_weights or [1.0 / len(self.plans)] * len(self.plans))
        if len(self.teacher_weights) != len(self.plans):
            raise ValueError(f"{len(self.teacher_weights)} teacher weights for {len(self.plans)} teachers")
        self.fused = fused and fusable(student)
        self.kd_weight, self.ce_weight = weights.get("kd", 1.0), weights.get("ce", 1.0)
        self.pairs, self.feature_loss = tuple(pairs), feature_loss
        t_shapes = {kind: tuple(t["shape"]) for kind, t in (targets or {}).items() if kind in F.RICH_KINDS}
        self.proj = torch.nn.ModuleDict()
        for p in self.pairs:
            if p.kind in ("hidden", "experts"):
                self.proj[p.key] = _projection(hidden_width(student.config), t_shapes[p.kind][0])
            elif p.kind == "kv":
                for side in ("key", "value"):
                    self.proj[f"{p.key}_{side}"] = _projection(math.prod(kv_shape(student.config)),
                                                               math.prod(t_shapes["kv"]))
        wanted: dict[str, set] = {}
        for p in self.pairs:
            wanted.setdefault(p.kind, set()).add(p.s)
        self.capture = Capture(student, {k: tuple(sorted(v)) for k, v in wanted.items()}, detach=False) \
            if wanted else None

    @property
    def loss_names(self) -> list[str]:
        """The keys of forward()'s loss dict, in a fixed order: kd, ce, then each rich kind with pairs."""
        return list(dict.fromkeys(["kd", "ce"] + [p.kind for p in self.pairs]))

    def _kw(self, plan: TargetPlan, T: float) -> dict:
        return dict(temperature=T, kind=self.divergence, tail=plan.tail, rel_error=plan.rel_error, draws=plan.draws)

    def _fused_losses(self, T, h, labels, *teachers):
        """_losses without the [N, V] float32 log-softmax (fused.py): the same values and gradients. The ids of
        every teacher (head, then sampled tail) go through one pass of the head."""
        head = self.student.get_output_embeddings()
        groups = [teachers[i:i + N_TARGETS] for i in range(0, len(teachers), N_TARGETS)]
        sampled = [p.tail == "sampled" for p in self.plans]
        sizes = [(g[0].shape[1], g[3].shape[1] if smp else 0) for g, smp in zip(groups, sampled)]

        def loss(s_ids, s_label, *targets):
            kd, at = 0.0, 0
            for j, (plan, (k, n), w) in enumerate(zip(self.plans, sizes, self.teacher_weights)):
                head_lp, tn, tail_lp, counts, logq = targets[5 * j:5 * j + 5]
                kd = kd + w * kd_rows_at(s_ids[:, at:at + k], head_lp, tn, s_tail=s_ids[:, at + k:at + k + n]
                                         if n else None, tail_logprobs=tail_lp, tail_counts=counts, tail_logq=logq,
                                         **self._kw(plan, T)).sum()
                at += k + n
            return kd * (T * T), -s_label.sum()

        dev = head.weight.device
        ids = torch.cat([t for g, smp in zip(groups, sampled) for t in ((g[0], g[3]) if smp else (g[0],))], 1)
        targets = tuple(t for g, smp in zip(groups, sampled) for t in (g[1], g[2], *(g[4:] if smp else (None,) * 3)))
        kd, ce, argmax = fused_kd_ce(h.to(dev), head.weight, head.bias, ids.to(dev), labels.to(dev), loss,
                                     tuple(t.to(dev) if t is not None else None for t in targets), T,
                                     (self.kd_weight, self.ce_weight), self.loss_chunk or None)
        head_ids, head_logprobs = groups[0][:2]
        top1 = torch.zeros((), dtype=torch.long)
        if not self.training and head_ids.shape[1]:
            t_top1 = torch.gather(head_ids, 1, head_logprobs.argmax(-1, keepdim=True))[:, 0]
            top1 = (argmax.cpu() == t_top1.cpu()).sum()
        return kd, ce, top1

    def _losses(self, T, h, labels, *teachers):
        logits = lm_logits(self.student, h)
        # One fused log-softmax serves CE and (at T=1) KD; a part with weight 0 is still reported
        # but kept out of the graph, so it costs no backward pass.
        lsm1 = torch.log_softmax(logits.float(), dim=-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.ce_weight > 0):
            ce, _ = ce_loss(lsm1, labels)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.kd_weight > 0):
            lsmT = lsm1 if T == 1 else torch.log_softmax(logits.float() / T, dim=-1)
            kd = 0.0
            for j, (plan, w) in enumerate(zip(self.plans, self.teacher_weights)):
                head_ids, head_logprobs, tnorm, tail_ids, tail_logprobs, tail_counts, tail_logq = \
                    teachers[N_TARGETS * j:N_TARGETS * (j + 1)]
                part, _ = kd_loss(lsmT, head_ids, head_logprobs, tnorm, tail_ids=tail_ids, tail_logprobs=tail_logprobs,
                                  tail_counts=tail_counts, tail_logq=tail_logq, **self._kw(plan, T))
                kd = kd + w * part
        head_ids, head_logprobs = teachers[:2]
        # Top-1 agreement with the teacher is an eval figure; an argmax over V per step is not free.
        top1 = torch.zeros((), dtype=torch.long)
        if not self.training and head_ids.shape[1]:
            t_top1 = torch.gather(head_ids, 1, head_logprobs.argmax(-1, keepdim=True))[:, 0]
            top1 = (logits.argmax(-1) == t_top1).sum()
        return kd, ce, top1

    def _cross_losses(self, T, h, labels, aligned, head_ids, head_logprobs, tnorm):
        """(KD sum over the aligned positions, CE sum, top-1 hits): the student's own tokens; head_ids are the
        student ids of the teacher's head (-1: no student token of the same bytes). "match" needs the
        student's log-probs at those ids alone, so it runs on the fused head as the other KD losses do."""
        s_ids = torch.where(aligned[:, None], head_ids, -1)  # an unaligned position matches nothing: KD 0 there
        ids = head_ids.clamp_min(0)
        if self.cross == "match" and self.fused:
            head = self.student.get_output_embeddings()

            def loss(s_at, s_label, m, lp, tn):
                return matched_kd_rows(s_at, m, lp, tn, T, self.plan.rel_error).sum() * (T * T), -s_label.sum()

            dev = head.weight.device
            kd, ce, argmax = fused_kd_ce(h.to(dev), head.weight, head.bias, ids.to(dev), labels.to(dev), loss,
                                         (s_ids.to(dev), head_logprobs.to(dev), tnorm.to(dev)), T,
                                         (self.kd_weight, self.ce_weight), self.loss_chunk or None)
        else:
            logits = lm_logits(self.student, h).float()
            argmax = logits.argmax(-1) if not self.training else None
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.ce_weight > 0):
                ce, _ = ce_loss(torch.log_softmax(logits, dim=-1), labels)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.kd_weight > 0):
                if self.cross == "uld":
                    kd, _ = uld_loss(logits[aligned], head_logprobs[aligned], tnorm[aligned], T)
                else:
                    s_at = torch.gather(torch.log_softmax(logits / T, dim=-1), 1, ids)
                    kd, _ = matched_kd_loss(s_at, s_ids, head_logprobs, tnorm, T, self.plan.rel_error)
        top1 = torch.zeros((), dtype=torch.long)
        if not self.training and ids.shape[1]:  # the teacher's top-1 where aligned and the student has it
            t_top1 = torch.gather(head_ids, 1, head_logprobs.argmax(-1, keepdim=True))[:, 0]
            top1 = ((argmax.to(t_top1.device) == t_top1) & aligned & (t_top1 >= 0)).sum()
        return kd, ce, top1

    def _gap(self, T: float, teachers: tuple) -> torch.Tensor:
        """Sum over the positions of losses.mixture_gap at T: a constant of the cache (no gradient)."""
        with torch.no_grad():
            heads, floors = [], []
            for plan, i in zip(self.plans, range(0, len(teachers), N_TARGETS)):
                lp = teachers[i + 1]
                p_top = teacher_log_probs(lp, teachers[i + 2], T)
                heads.append((teachers[i], p_top))
                floors.append(rounding_floor(p_top, lp, plan.rel_error, T))
            return mixture_gap(heads, self.teacher_weights, floors).sum()

    def _rich_losses(self, valid, shape, rich: dict) -> dict[str, torch.Tensor]:
        """Sum over valid positions of each rich loss, averaged over its layer pairs."""
        got = self.capture.collect(*shape)
        n_pairs = {k: sum(p.kind == k for p in self.pairs) for k in F.RICH_KINDS}
        sums: dict[str, torch.Tensor] = {}
        for p in self.pairs:
            if p.kind == "router":
                part, _ = router_loss(got[("router", p.s)][:, :-1][valid], rich[F.rich_name("router", p.t)][:, :-1][valid])
            elif p.kind == "kv":
                part = 0.0
                for side in ("key", "value"):
                    s = self.proj[f"{p.key}_{side}"](got[("kv", p.s, side)][:, :-1][valid].flatten(1))
                    t = rich[F.rich_name("kv", p.t, side)][:, :-1][valid]
                    part = part + feature_loss(s.view(t.shape), t, self.feature_loss)[0] / 2
            else:
                s = self.proj[p.key](got[(p.kind, p.s)][:, :-1][valid])
                t = rich[F.rich_name(p.kind, p.t)][:, :-1][valid]
                part, _ = feature_loss(s[:, None], t[:, None], self.feature_loss)
            sums[p.kind] = sums.get(p.kind, 0.0) + part / n_pairs[p.kind]
        return sums

    def forward(self, batch: Batch):
        kwargs = self.capture.forward_kwargs() if self.capture else {"use_cache": False}
        h = self.student.base_model(input_ids=batch.input_ids, **kwargs).last_hidden_state
        valid = batch.loss_mask[:, 1:]  # the prediction at t is for token t+1
        if len(batch.teachers) != len(self.plans) - 1:
            raise ValueError(f"a batch of {1 + len(batch.teachers)} teachers for a Distiller of {len(self.plans)}")
        args = (h[:, :-1][valid], batch.input_ids[:, 1:][valid],
                *(a[:, :-1][valid] for b in (batch, *batch.teachers)
                  for a in (b.head_ids, b.head_logprobs, b.tnorm, b.tail_ids, b.tail_logprobs, b.tail_counts,
                            b.tail_logq)))
        n = args[0].shape[0]
        T = self.plan.temperature if batch.temperature is None else batch.temperature  # a schedule's, per step
        if self.cross:
            kd, ce, top1 = self._cross_losses(T, *args[:2], batch.aligned[:, :-1][valid], *args[2:5])
            return {"kd": kd, "ce": ce}, top1, n
        chunk = self.loss_chunk or n
        if self.fused:
            kd, ce, top1 = self._fused_losses(T, *args)
        elif chunk >= n:
            kd, ce, top1 = self._losses(T, *args)
        else:
            # Checkpointing each chunk keeps only [chunk, V] logits alive: recomputed in backward.
            kd = ce = top1 = 0
            for s in range(0, n, chunk):
                part = [a[s:s + chunk] for a in args]
                k_, c_, t_ = torch.utils.checkpoint.checkpoint(self._losses, T, *part, use_reentrant=False)
                kd, ce, top1 = kd + k_, ce + c_, top1 + t_
        if len(self.plans) > 1 and all(p.tail != "renorm" for p in self.plans):
            kd = kd - self._gap(T, args[2:]) * (T * T)  # from the sum of the teachers' losses to KL to their mixture
        losses = {"kd": kd, "ce": ce}
        if self.pairs:
            losses.update(self._rich_losses(valid, batch.input_ids.shape, batch.rich))
        return losses, top1, n


def fusable(student) -> bool:
    """Whether the student's logits are a plain linear head of its last hidden state (fused.py computes
    exactly those); a logit scale or soft-capping (modeling.lm_logits) takes the plain path."""
    head = student.get_output_embeddings()
    c = text_config(student.config)
    scale = getattr(c, "logit_scale", None)
    return isinstance(head, torch.nn.Linear) and not getattr(c, "final_logit_softcapping", None) and \
        not (isinstance(scale, (int, float)) and scale != 1)


def resolve_pairs(cache, student, weights: dict[str, float], layer_map: str | None) -> tuple[Pair, ...]:
    """The (teacher layer, student layer) pairs of every rich loss with a weight (``weights``: kind -> weight):
    --layer-map, or each stored teacher layer to the student layer at the same relative depth. Refuses
    what cannot work."""
    n_t, n_s = int(cache.attrs.teacher["num_layers"]), layer_count(student.config)
    explicit = dict(parse_layer_map(layer_map)) if layer_map else None
    for t, s in (explicit or {}).items():
        if not 0 <= t < n_t or not 0 <= s < n_s:
            raise PikvError(f"--layer-map {t}:{s}: the teacher has layers 0..{n_t - 1} and the student 0..{n_s - 1}")
    pairs = []
    for kind in F.RICH_KINDS:
        w = weights.get(kind, 0.0)
        if not w:
            continue
        flag = "--" + weight_field(kind).replace("_", "-")
        stored = cache.attrs.targets.get(kind)
        if not stored:
            raise PikvError(f"{flag} {w:g}: the cache holds no {kind} targets; re-dump with "
                            f"--targets {kind}{':LAYERS' if kind != 'router' else ''} or drop {flag}")
        layers = [int(x) for x in stored["layers"]]
        if explicit is not None:
            use = [(t, explicit[t]) for t in layers if t in explicit]
            if not use:
                raise PikvError(f"{flag}: none of the cache's {kind} layers {layers} is in --layer-map {layer_map}")
        else:
            use = [(t, min(n_s - 1, max(0, round((t + 1) * n_s / n_t) - 1))) for t in layers]
        if kind == "router":
            s_moe = moe_layers(student)
            if not s_moe:
                raise PikvError(f"{flag}: the student ({student.config.model_type}) is dense; router "
                                "distillation needs a mixture-of-experts student with the teacher's expert count")
            for t, s in use:
                if s not in s_moe:
                    raise PikvError(f"{flag}: student layer {s} (from teacher layer {t}) is not a MoE layer; "
                                    f"the student's MoE layers are {sorted(s_moe)}: set --layer-map")
                e_s, e_t = router_experts(s_moe[s][0]), int(stored["shape"][0])
                if e_s != e_t:
                    raise PikvError(f"{flag}: the student's router has {e_s} experts, the teacher's {e_t}; "
                                    "router distillation needs the same expert count")
        pairs += [Pair(kind, t, s) for t, s in use]
    return tuple(pairs)
