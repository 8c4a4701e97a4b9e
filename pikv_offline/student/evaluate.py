"""Held-out figures of any student checkpoint against a cache.

    pikv eval --cache CACHE --student RUN/final [--temperature 1] [--json]

The held-out sequences are the ones train-student holds out with the same --eval-fraction.
"""

from __future__ import annotations

import contextlib

import torch

from .. import dist
from ..cache.reader import open_cache
from ..errors import PikvError, brief
from . import data as D
from .train import Distiller, check_compatible, evaluate, resolve_targets


def run(*, cache: str, student: str, temperature: float = 1.0, divergence: str = "forward_kl",
        tail: str = "auto", top_k: int | None = None, eval_fraction: float = 0.01, batch_size: int = 8,
        device: str = "auto") -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = dist.init(device)
    try:
        c = open_cache(cache)
        k, t_index, tail = resolve_targets(c, top_k, temperature, tail, divergence)
        try:
            model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        except Exception as e:
            raise PikvError(f"--student {student}: cannot load it as a causal LM ({brief(e)})")
        try:
            tok = AutoTokenizer.from_pretrained(student)
        except Exception:
            tok = None
        check_compatible(model, tok, c.attrs)
        index = D.CacheIndex(c, eval_fraction)
        if len(index.eval) == 0:
            raise PikvError(f"--eval-fraction {eval_fraction} selects no held-out sequence of this cache")
        net = Distiller(model.to(d.device), temperature=temperature, divergence=divergence, tail=tail, loss_chunk=0,
                        rel_error=c.relative_error, draws=c.tail)
        return evaluate(net, c, index, batch_size, d, contextlib.nullcontext, k, t_index)
    finally:
        dist.teardown()
