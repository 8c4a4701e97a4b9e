"""`pikv sweep`: the cross product of a grid of train-student settings, all reading one cache.

    pikv sweep --cache CACHE --student-config student.json --out SWEEP \
        --grid temperature=1,2,4 --grid kd-weight=0.5,1.0 --max-steps 300
    torchrun --nproc-per-node 2 -m pikv_offline sweep ...

Runs go one after another in one process group. A run whose final/ exists is skipped (its
figures are read back from its metrics), and one with a checkpoint but no final/ is resumed, so
a sweep can be re-run after a crash. Writes SWEEP/results.csv and SWEEP/results.png.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

from .. import dist, storage
from ..cache.reader import open_cache
from ..config import SweepConfig, TrainConfig
from ..errors import PikvError
from ..student import checkpoint
from ..student import data as D
from ..student.train import train
from .plot import mean_tokens_per_s, plot_runs, read_metrics


# Settings that change how a run goes, not what it computes: a re-run may differ in them.
OPERATIONAL = ("resume", "out", "cache", "num_workers", "reader", "log_every", "save_every", "eval_every",
               "tensorboard", "wandb", "device", "loss_chunk", "trust_remote_code")


def check_finished(name: str, tcfg: TrainConfig, cache_key: str | None, cache_k: int | None) -> None:
    """A finished run is reported as it stands only if it was this grid point's run: a sweep re-run into the same
    --out with other caches (by content: their key) or settings would otherwise list the old runs under the new
    settings. config.json holds top_k as resolved (``cache_k`` where the flag was not given)."""
    path = os.path.join(tcfg.out, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise PikvError(f"sweep run {name}: {tcfg.out} has a final/ but no readable config.json ({e}); remove that run "
                        "folder or use a new --out")
    saved = saved if isinstance(saved, dict) else {}
    want = json.loads(json.dumps(tcfg.to_dict()))
    if want.get("top_k") is None:
        want["top_k"] = cache_k
    if cache_key is not None:
        want["cache_key"] = cache_key
    differ = [k for k in want if k not in OPERATIONAL and k in saved  # missing: a run of an earlier pikv
              and saved[k] != want[k]]
    if differ:
        k = differ[0]
        what = "cache (by content)" if k == "cache_key" else "--" + k.replace("_", "-")
        raise PikvError(f"sweep run {name}: the finished run in {tcfg.out} had another {what}: {saved.get(k)}, this "
                        f"sweep asks for {want[k]}; use a new --out (or remove that run folder)")


def run(cfg: SweepConfig) -> list[dict]:
    # Build every run's config first: a bad grid value fails before any training starts.
    configs = [(cfg.run_name(p), p, TrainConfig(**{**cfg.base, **p, "out": os.path.join(cfg.out, cfg.run_name(p))}))
               for p in cfg.points()]
    cache_key = cache_k = None
    if configs and all(storage.exists(c) for c in configs[0][2].cache):  # what the caches cannot serve, before any run
        cache, *more = [open_cache(c) for c in configs[0][2].cache]
        cache_key, cache_k = checkpoint.joint_cache_key((cache, *more)), cache.top_k
        for name, _, t in configs:
            try:
                plan = D.plan_targets(cache, t.top_k, t.temperature, t.tail, t.divergence,
                                      schedule=t.temperature_schedule, cross=bool(t.student_tokenizer))
                D.plan_teachers(plan, cache, more, top_k=t.top_k, tail=t.tail, divergence=t.divergence,
                                schedule=t.temperature_schedule, total_steps=1)
            except PikvError as e:
                raise PikvError(f"sweep run {name}: {e}")
    d = dist.init(cfg.base.get("device", "auto"))
    try:
        rows = []
        for i, (name, point, tcfg) in enumerate(configs):
            if os.path.isdir(os.path.join(tcfg.out, "final")):
                check_finished(name, tcfg, cache_key, cache_k)
                dist.print0(f"[{i + 1}/{len(configs)}] {name}: finished before, skipped")
            else:
                resume = checkpoint.latest(tcfg.out) is not None
                dist.print0(f"[{i + 1}/{len(configs)}] {name}" + (" (resuming)" if resume else ""))
                train(dataclasses.replace(tcfg, resume="strict" if resume else "no"), d)
            steps, ev = read_metrics(tcfg.out)
            tps = mean_tokens_per_s(steps)
            rows.append({"run": name, **point, "steps": steps[-1]["step"] if steps else 0,
                         **{k: ev.get(k) for k in ("eval_ce", "eval_ppl", "eval_kd", "eval_top1")},
                         "tokens_per_s": round(tps, 1) if tps else None})
        if d.is_main:
            with open(os.path.join(cfg.out, "results.csv"), "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            plot_runs({r["run"]: os.path.join(cfg.out, r["run"]) for r in rows},
                      os.path.join(cfg.out, "results.png"), title="sweep over " + " + ".join(configs[0][2].cache))
            width = max(len(r["run"]) for r in rows)
            print(f"\n| {'run':<{width}} | held-out CE | perplexity | top-1 = teacher | tok/s |")
            for r in rows:
                num = lambda k: float("nan") if r[k] is None else r[k]  # noqa: E731 (a run without eval)
                print(f"| {r['run']:<{width}} | {num('eval_ce'):11.4f} | {num('eval_ppl'):10.2f} | "
                      f"{num('eval_top1'):15.3f} | {r['tokens_per_s'] or 0:5.0f} |")
            print(f"wrote {os.path.join(cfg.out, 'results.csv')} and results.png")
        return rows
    finally:
        dist.teardown()
