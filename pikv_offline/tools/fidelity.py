"""`pikv verify --recompute N`: how faithful a cache is to its teacher (needs both stages).

    pikv verify CACHE --recompute 8 --teacher DIR [--student DIR] [--json]

After the integrity check (cache/verify.py) the teacher is re-run on the first N sequences and,
per loss mode and grid temperature, reports
  max_logprob_err  max |stored - live| log p_T over the stored ids (head, and tail draws);
  kl               mean KL(teacher || cache) over the buckets the mode compares: head ids + one
                   tail bucket (bucket; for sampled the tail bucket is its importance-weighted
                   mass estimate, renormalized with the head), head only, renormalized (renorm).
                   It measures what storage and sampling lose on those buckets, not what a mode
                   ignores inside the tail: the angle shows that;
  angle_deg        with --student: the angle between the student's parameter gradient of the
                   mode's loss (with the stored draws, as one training step sees them) and of the
                   full-vocabulary KL at T against the live teacher.
Rich targets (hidden / kv / router / experts) are compared with a live capture of the same layers:
max error over each group's absmax against the encoding's bound, and the relative RMS error. The
teacher runs in float32, so a cache dumped in bf16 shows that compute difference too.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..cache import format as F
from ..cache.reader import open_cache
from ..cache.verify import check_integrity
from ..config import VerifyConfig
from ..errors import PikvError
from ..modeling import load_error, refuse_adapter_folder
from ..student.losses import kd_rows, rounding_floor, tail_log_proposal, tail_mass, tail_weights
from ..teacher import model as M


def run(cfg: VerifyConfig) -> dict:
    result = check_integrity(cfg.cache, cfg.trust_remote_code)
    if cfg.recompute:
        result["recompute"] = recompute(cfg)
    return result


def recompute(cfg: VerifyConfig) -> dict:
    cache = open_cache(cfg.cache)
    folder = M.resolve_teacher(cfg.teacher)
    if M.weights_identity(folder) != cache.attrs.teacher["weights_sha256"]:
        raise PikvError(f"--teacher {cfg.teacher} is not the teacher that wrote this cache (weights differ); "
                        "pass the one named in `pikv inspect`")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    n = min(cfg.recompute, int(cache.attrs.counts["sequences"]))
    a = cache.read_all(first=n)
    teacher = M.load_model(folder, cfg.teacher, torch.float32, device, None, cfg.trust_remote_code)
    x = torch.from_numpy(a[F.INPUT_IDS].astype(np.int64)).to(device)
    rich = _recompute_rich(teacher, cache, a, x, cfg.batch_size)
    with torch.inference_mode():
        live = torch.cat([teacher(x[s:s + cfg.batch_size]).logits.float()
                          for s in range(0, n, cfg.batch_size)])
    del teacher
    valid = torch.from_numpy(a[F.LOSS_MASK][:, 1:]).to(device)
    live = torch.log_softmax(live[:, :-1][valid], -1)  # [P, V] the live T=1 log-probs of the valid positions

    def pos(name, dtype=None):
        t = torch.from_numpy(a[name][:, :-1]).to(device)[valid]
        return t if dtype is None else t.to(dtype)

    h_ids, h_lp, tnorm = pos(F.HEAD_IDS), pos(F.HEAD_LOGPROBS), pos(F.TNORM)
    t_ids, t_lp, t_cnt = pos(F.TAIL_IDS), pos(F.TAIL_LOGPROBS), pos(F.TAIL_COUNTS, torch.float32)
    rel = cache.relative_error
    t_logq = None
    if cache.draws:  # the density each draw came from (the dump's proposal), as training computes it
        strata = F.tail_strata(cache.tail_temperatures, cache.draws)
        t_logq = tail_log_proposal(h_lp, t_lp, tnorm[:, [cache.temperatures.index(t) for t, _ in strata]], strata,
                                   cache.draws, rel)
    student, s_logits = None, None
    if cfg.student:
        from transformers import AutoModelForCausalLM

        refuse_adapter_folder(cfg.student, "--student")
        try:
            student = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32,
                                                           trust_remote_code=cfg.trust_remote_code).to(device)
        except Exception as e:
            raise PikvError(load_error(e, "--student", cfg.student, "cannot load it as a causal LM"))
        if student.get_output_embeddings().weight.shape[0] < live.shape[1]:
            raise PikvError("--student's vocabulary does not cover the teacher's")
        from ..student.model import check_compatible, load_tokenizer

        # the angles feed the teacher's ids to the student: a cross-tokenizer student's ids mean other text
        check_compatible(student, load_tokenizer(cfg.student, cfg.trust_remote_code), cache.attrs)
        s_logits = student(x).logits.float()[:, :-1][valid]  # its whole vocabulary, as in training
        params = [p for p in student.parameters() if p.requires_grad]

    def grad(loss):
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten() for gi, p in zip(g, params)])

    modes = ["bucket", "renorm"] + (["sampled"] if cache.draws else [])
    if cache.top_k == 0:
        modes = ["sampled"]
    draws_equal = _redrawn_tail(cache, a, valid, live, h_ids, t_ids, t_cnt) if cache.draws else None
    rows = []
    for j, T in enumerate(cache.temperatures):
        live_T = torch.log_softmax(live / T, -1)
        stored_head = h_lp / T - tnorm[:, j:j + 1]
        live_head = torch.gather(live_T, 1, h_ids)
        full_grad = None
        if student is not None:
            s_T = torch.log_softmax(s_logits / T, -1)
            full_grad = grad((live_T.exp() * (live_T - s_T[:, :live.shape[1]])).sum() * T * T)
        for mode in modes:
            err = (stored_head - live_head).abs().amax().item() if h_ids.shape[1] else 0.0
            if mode == "sampled":
                used = t_cnt > 0
                stored_tail = t_lp / T - tnorm[:, j:j + 1]
                tail_err = (stored_tail - torch.gather(live_T, 1, t_ids)).abs()[used]
                err = max(err, tail_err.amax().item() if tail_err.numel() else 0.0)
            row = {"mode": mode, "T": T, "max_logprob_err": err,
                   "kl": _partition_kl(mode, live_head, stored_head, h_lp, t_lp, t_cnt, t_logq, tnorm[:, j], T,
                                       cache.draws, rel)}
            if student is not None:
                g = grad(kd_rows(s_T, h_ids, h_lp, tnorm[:, j], temperature=T, tail=mode, rel_error=rel,
                                 tail_ids=t_ids, tail_logprobs=t_lp, tail_counts=t_cnt, tail_logq=t_logq,
                                 draws=cache.draws).sum() * T * T)
                cos = torch.nn.functional.cosine_similarity(g, full_grad, 0).clamp(-1, 1).item()
                row["angle_deg"] = math.degrees(math.acos(cos))
            rows.append(row)
    return {"sequences": n, "positions": int(valid.sum()), "teacher": cfg.teacher, "student": cfg.student,
            "rows": rows, "rich": rich, "tail_draws_equal": draws_equal}


def _redrawn_tail(cache, a: dict, valid: torch.Tensor, live: torch.Tensor, h_ids: torch.Tensor, t_ids: torch.Tensor,
                  t_cnt: torch.Tensor) -> float:
    """The fraction of positions whose stored tail draws are the ones the live teacher gives with the
    documented uniforms, slot temperatures and head (FORMAT.md): a tail_temperatures rewritten, or draws
    that are not this teacher's, show here. A dump in float32 (this check's own precision) must agree;
    in bf16/fp16 the teacher's CDF moves and a draw near a step may differ."""
    from ..teacher.dump import tail_uniforms

    n = cache.draws
    u = torch.from_numpy(tail_uniforms(cache.attrs.cache_key, a[F.SAMPLE_ID], cache.seq_len, n))
    u = u[:, :-1].to(live.device)[valid]  # [P, n], the positions verify compares
    slots_at = M.tail_slots(cache.tail_temperatures, n, live.device)
    redrawn = torch.empty(u.shape, dtype=torch.long, device=live.device)
    step = max(1, (64 << 20) // (4 * live.shape[1]))  # ~64 MiB of float32 per chunk of positions
    for s in range(0, live.shape[0], step):
        shifted = live[s:s + step] - live[s:s + step].amax(-1, keepdim=True)
        for t, slots in slots_at.items():
            redrawn[s:s + step, slots] = M.sample_tail((shifted / t).exp(), h_ids[s:s + step], u[s:s + step][:, slots])
    stored = [torch.repeat_interleave(i, c.long()) for i, c in zip(t_ids, t_cnt)]
    same = [torch.equal(torch.sort(r[r >= 0]).values, st) for r, st in zip(redrawn, stored)]
    frac = float(np.mean(same)) if same else 1.0
    if cache.attrs.teacher.get("dtype") == "float32" and frac < 0.9:
        raise PikvError(f"{cache.path}: the stored tail draws of {100 * (1 - frac):.0f}% of the checked positions are "
                        "not the live teacher's with the documented uniforms and tail_temperatures "
                        f"{cache.tail_temperatures}: the cache's tail or its attributes were altered; re-dump it")
    return frac


def _recompute_rich(teacher, cache, a: dict, x: torch.Tensor, batch_size: int) -> list[dict]:
    """Each stored rich array against the live teacher: max error over its group's absmax, relative RMS
    error and the encoding's bound (fp16 2^-11, bf16 2^-8 relative; int8 1/254 of the group's absmax)."""
    cap = M.open_capture(teacher, cache.attrs.targets, cache.seq_len)
    if cap is None:
        return []
    parts = []
    with torch.inference_mode():
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size]
            teacher.base_model(input_ids=xb, **cap.forward_kwargs())
            parts.append({k: v.cpu().numpy() for k, v in M.rich_targets(cap, *xb.shape).items()})
    cap.close()
    rows = []
    for r in cache.rich:
        live = np.concatenate([p[r.name] for p in parts])
        e = F.error_summary(F.encoding_error(live, a[r.name], r.group))
        rows.append({"array": r.name, "encoding": r.encoding, "bound": F.TENSOR_ERROR_BOUNDS[r.encoding], **e})
    return rows


def _partition_kl(mode, live_head, stored_head, h_lp, t_lp, t_cnt, t_logq, tnorm, T, draws, rel) -> float:
    """Mean KL(teacher || cache) over the buckets the mode's loss compares (see the module docstring)."""
    if mode == "renorm":
        p, q = torch.log_softmax(live_head, -1), torch.log_softmax(stored_head, -1)
        return (p.exp() * (p - q)).sum(-1).mean().item()
    live_tail = (-torch.expm1(torch.logsumexp(live_head, -1))).clamp_min(0)
    if mode == "bucket":
        stored_tail = tail_mass(stored_head, rounding_floor(stored_head, h_lp, rel, T))
    else:
        stored_tail = tail_weights(t_lp, t_cnt, t_logq, tnorm, T, draws).sum(-1)
    p = torch.cat([live_head.exp(), live_tail[:, None]], -1).double()
    q = torch.cat([stored_head.exp(), stored_tail[:, None]], -1).double()
    q = q / q.sum(-1, keepdim=True)  # the sampled tail's mass is an estimate: q need not sum to 1
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), torch.zeros_like(p))
    return terms.sum(-1).mean().item()
