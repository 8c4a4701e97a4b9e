"""Online KD, the comparison our users make: train-student's own loop with the teacher resident, each
batch's targets computed live at k = V (the whole vocabulary), so the bucket loss is exactly the
full-vocabulary KL at T. The batches (sequences, order, ranks) are the cache's, so a run here and a run
from the cache differ only in where the targets come from.

    torchrun --nproc-per-node 2 -m pikv_offline.tools.online --teacher DIR --train-config RUN.json
    (RUN.json: train-student's settings by field name, e.g. {"cache": ..., "out": ..., "student_config": ...})

Used by the demo and bench/quality.py; not part of the product (stage two never loads a teacher).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from ..cache.reader import open_cache
from ..config import TrainConfig
from ..errors import PikvError
from ..modeling import lm_logits
from ..student import data as D
from ..student.train import run as train


def online_source(cfg: TrainConfig, teacher_dir: str):
    """train()'s data source: this rank's cached batches in the cache's order (read in this process),
    their head replaced by the resident teacher's full T=1 log-softmax and the normalizer at
    ``cfg.temperature`` (log p_T = lp / T - tnorm_T, as the cache stores it)."""
    from transformers import AutoModelForCausalLM

    if len(cfg.cache) != 1:
        raise PikvError("online KD runs one resident teacher: give one --cache")
    cache = open_cache(cfg.cache[0])
    plan = D.plan_targets(cache, cfg.top_k, cfg.temperature, "bucket", cfg.divergence)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, trust_remote_code=False).eval()
    ids = torch.arange(teacher.get_output_embeddings().weight.shape[0])
    T = cfg.temperature

    def source(epoch: int, start: int):
        # the rank is known once train() has set up the process group, when it first asks for batches
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
            if torch.distributed.is_initialized() else (0, 1)
        cached = D.train_batches(cfg.cache[0], D.CacheIndex(cache, cfg.eval_fraction), plan, seed=cfg.seed,
                                 batch_size=cfg.batch_size, rank=rank, world_size=world, grad_accum=cfg.grad_accum,
                                 num_workers=0, pin_memory=False)
        for batch in cached(epoch, start):
            with torch.no_grad():  # the whole vocabulary as the head: no top-k to select, no tail left
                hidden = teacher.base_model(input_ids=batch.input_ids, use_cache=False).last_hidden_state
                lp = torch.log_softmax(lm_logits(teacher, hidden).float(), dim=-1)
                tnorm = torch.logsumexp(lp / T, dim=-1) if T != 1 else torch.zeros(lp.shape[:-1])
            yield dataclasses.replace(batch, head_ids=ids.expand(*lp.shape), head_logprobs=lp, tnorm=tnorm)
    return source


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--train-config", required=True, help="JSON object of TrainConfig fields")
    args = ap.parse_args(argv)
    with open(args.train_config) as f:
        cfg = TrainConfig(**{**json.load(f), "tail": "bucket", "num_workers": 0})
    train(cfg, online_source(cfg, args.teacher))


if __name__ == "__main__":
    main()
