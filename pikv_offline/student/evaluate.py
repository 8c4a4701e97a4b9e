"""Held-out figures of a student against a cache: the training loop's eval, and `pikv eval`.

    pikv eval --cache CACHE --student RUN/final [--temperature 1] [--json]

The held-out sequences are the ones train-student holds out with the same --eval-fraction.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .. import dist
from ..cache.reader import open_cache
from ..config import EvalConfig
from ..errors import PikvError
from . import data as D
from .distiller import Distiller
from .model import check_compatible, check_positions, load_student


@torch.no_grad()
def evaluate(model: Distiller, batches, d: dist.Dist, autocast=contextlib.nullcontext) -> dict:
    """Held-out CE, perplexity, KD loss, top-1 agreement with the teacher and each rich loss over this
    rank's ``batches``, summed over all ranks; {} when no rank has a held-out position."""
    was_training = model.training
    model.eval()
    names = model.loss_names
    sums = dict.fromkeys(names, 0.0)
    top1 = n = 0.0
    for batch in batches:
        with autocast():
            losses, t_, n_ = model(batch.to(d.device))
        for k, v in losses.items():
            sums[k] += float(v)
        top1, n = top1 + float(t_), n + n_
    totals = dist.all_reduce_sum([sums[k] for k in names] + [top1, n], d.device)
    model.train(was_training)
    n = totals[-1]
    if n == 0:
        return {}
    got = dict(zip(names, totals))
    out = {"eval_ce": got["ce"] / n, "eval_ppl": math.exp(min(got["ce"] / n, 50)), "eval_kd": got["kd"] / n,
           "eval_top1": totals[-2] / n, "eval_tokens": int(n)}
    out.update({f"eval_{k}": got[k] / n for k in names[2:]})
    return out


def run(cfg: EvalConfig) -> dict:
    d = dist.init(cfg.device)
    try:
        cache = open_cache(cfg.cache)
        plan = D.plan_targets(cache, cfg.top_k, cfg.temperature, cfg.tail, cfg.divergence, cross=cfg.cross_tokenizer)
        model, tok = load_student(cfg.student, None, 0)
        if cfg.cross_tokenizer:  # the student's own tokenizer, saved in its folder by a cross-tokenizer run
            from .xtok import token_bytes

            if tok is None:
                raise PikvError(f"--cross-tokenizer: {cfg.student} holds no tokenizer; give RUN/final of a run with "
                                "--student-tokenizer")
            if cache.top_k == 0:
                raise PikvError("--cross-tokenizer: cross-tokenizer KD needs the teacher's top-k and this cache has "
                                "none")
            token_bytes(tok)
            vocab = int(model.get_output_embeddings().weight.shape[0])
            if vocab < len(tok):
                raise PikvError(f"--cross-tokenizer: {cfg.student} holds a tokenizer of {len(tok)} tokens for a head "
                                f"of {vocab}; that tokenizer is not the one the student was trained with")
        else:
            check_compatible(model, tok, cache.attrs)
        check_positions(model, cache.seq_len)
        index = D.CacheIndex(cache, cfg.eval_fraction)
        if len(index.eval) == 0:
            raise PikvError(f"--eval-fraction {cfg.eval_fraction} selects no held-out sequence of this cache")
        net = Distiller(model.to(d.device), plan, weights={}, divergence=cfg.divergence,
                        cross=(cfg.cross_loss or "match") if cfg.cross_tokenizer else None)
        return evaluate(net, D.eval_batches(cache, index, plan, rank=d.rank, world_size=d.world_size,
                                            batch_size=cfg.batch_size,
                                            student_tokenizer=cfg.student if cfg.cross_tokenizer else None), d)
    finally:
        dist.teardown()
