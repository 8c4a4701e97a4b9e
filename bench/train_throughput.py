"""Stage two: train-student throughput and peak memory versus plain CE training of the same student.

    python bench/train_throughput.py --cache runs/demo/cache --student-config bench/student.json

Each mode runs in its own process (so peak memory is its own):
  ce       plain loop: the same student, the same token batches (preloaded in memory), HF forward
           + masked next-token CE, AdamW; the baseline.
  kd       `pikv train-student` from the cache: top-k KD with the cache's default tail (bucket, or
           sampled when it holds draws), kd-weight 1.
  kd+ce    the same with ce-weight 0.5.
  kd+ce+rich  (a cache with rich targets) kd+ce plus every rich loss the cache can feed, weight 1 each
           (--hidden-weight / --kv-weight / --router-weight / --experts-weight).
  ce-fused  `pikv train-student` with kd-weight 0, ce-weight 1: CE through the fused head (student/fused.py),
           a chunked CE that never holds [N, V] logits: the memory reference for kd+ce.
  kd+ce-plain  kd+ce through the plain head: the [N, V] float32 log-softmax (--loss-chunk N: checkpointed
           chunks of N positions instead), what train-student did before the fused head.
--modes picks them (default ce,kd,kd+ce; for a large vocabulary: ce,ce-fused,kd+ce,kd+ce-plain, and
bench/shapes.py makes the teacher, the cache and the student).
Tokens/s counts loss tokens over the timed steps (the first --warmup steps are not timed). Peak
memory is the process's max RSS on CPU and torch.cuda.max_memory_allocated on GPU. Prints one
JSON line per mode and a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


MODES = ("ce", "kd", "kd+ce", "kd+ce+rich", "ce-fused", "kd+ce-plain")


def _vocab(student_config: str) -> int:
    return int(json.load(open(student_config))["vocab_size"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ce(args, device) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from pikv_offline.cache.reader import open_cache
    from pikv_offline.student import data as D

    cache = open_cache(args.cache)
    index = D.CacheIndex(cache, 0.0)
    order = index.epoch_order(args.seed, 0)
    n = (args.steps + args.warmup) * args.batch_size
    rows = D.read_rows(cache, order[:n])
    x_all = torch.from_numpy(rows["input_ids"].astype("int64"))
    m_all = torch.from_numpy(rows["loss_mask"])
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.load(open(args.student_config))))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    amp = torch.bfloat16 if device.type == "cuda" else None
    tokens, t0 = 0, None
    for step in range(args.steps + args.warmup):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        sl = slice(step * args.batch_size, (step + 1) * args.batch_size)
        x, mask = x_all[sl].to(device), m_all[sl].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x).logits[:, :-1]
            valid = mask[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[valid].float(), x[:, 1:][valid])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            tokens += int(valid.sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"tokens_per_s": tokens / (time.perf_counter() - t0), "tokens": tokens}


def run_kd(args, device, ce_weight: float, rich: bool = False, kd_weight: float = 1.0, plain: bool = False) -> dict:
    from pikv_offline.cache.format import RICH_KINDS
    from pikv_offline.cache.reader import open_cache
    from pikv_offline.config import TrainConfig, weight_field
    from pikv_offline.student.train import run

    if plain:
        from pikv_offline.student import distiller
        distiller.fusable = lambda student: False
    targets = open_cache(args.cache).attrs.targets
    weights = {weight_field(kind): 1.0 for kind in RICH_KINDS if rich and kind in targets}
    with tempfile.TemporaryDirectory() as out:
        res = run(TrainConfig(cache=args.cache, student_config=args.student_config, out=out,
                              max_steps=args.steps + args.warmup, batch_size=args.batch_size, kd_weight=kd_weight,
                              ce_weight=ce_weight, eval_fraction=0.0, log_every=10**9, seed=args.seed,
                              num_workers=args.num_workers, loss_chunk=args.loss_chunk, **weights))
    hist = res["history"]
    tokens = sum(n for _, n in hist[args.warmup:])
    return {"tokens_per_s": tokens / (hist[-1][0] - hist[args.warmup - 1][0]), "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--student-config", default=os.path.join(os.path.dirname(__file__), "student.json"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--loss-chunk", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default=None, help="comma-separated modes [default: ce,kd,kd+ce(,kd+ce+rich)]")
    ap.add_argument("--mode", choices=MODES, default=None, help="(internal) run one mode")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.mode:
        m = args.mode
        res = run_ce(args, device) if m == "ce" else \
            run_kd(args, device, 1.0, kd_weight=0.0) if m == "ce-fused" else \
            run_kd(args, device, 0.0 if m == "kd" else 0.5, rich=m == "kd+ce+rich", plain=m == "kd+ce-plain")
        print(json.dumps({"bench": "train_throughput", "mode": args.mode, "device": str(device),
                          "threads": torch.get_num_threads(), "batch_size": args.batch_size, "steps": args.steps,
                          "loss_chunk": args.loss_chunk, "tokens_per_s": round(res["tokens_per_s"], 1),
                          "timed_tokens": res["tokens"], "vocab_size": _vocab(args.student_config),
                          "peak_memory_mb": round(peak_memory_mb(device), 1)}))
        return
    from pikv_offline.cache.reader import open_cache

    results = {}
    modes = tuple(args.modes.split(",")) if args.modes else \
        ("ce", "kd", "kd+ce") + (("kd+ce+rich",) if open_cache(args.cache).rich else ())
    for mode in modes:
        if mode not in MODES:
            sys.exit(f"--modes: unknown mode {mode!r}; modes are {', '.join(MODES)}")
        p = subprocess.run([sys.executable, __file__, "--mode", mode, *sys.argv[1:]], capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"mode {mode} failed:\n{p.stderr[-3000:]}")
        line = p.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        results[mode] = json.loads(line)
    ce = results["ce"]
    print(json.dumps({"bench": "train_throughput_summary",
                      **{f"{m}_over_ce_tokens_per_s": round(results[m]["tokens_per_s"] / ce["tokens_per_s"], 3)
                         for m in modes[1:]},
                      **{f"{m}_over_ce_peak_memory": round(results[m]["peak_memory_mb"] / ce["peak_memory_mb"], 3)
                         for m in modes[1:]},
                      **({f"{m}_over_ce_fused_peak_memory":
                          round(results[m]["peak_memory_mb"] / results["ce-fused"]["peak_memory_mb"], 3)
                          for m in modes if m not in ("ce", "ce-fused")} if "ce-fused" in results else {})}))


if __name__ == "__main__":
    main()
