"""Quality: held-out CE of students trained from one cache versus CE only and online full-vocabulary KD.

    python bench/quality.py --workdir runs/demo        (after `make demo`: its teacher, caches, student config)

Every run trains the same student config with the same seed, data order, steps and optimizer
through `pikv train-student`'s own loop, and is evaluated on the held-out cache (documents the
teacher never saw). Runs:
  ce only            kd-weight 0, ce-weight 1
  online full KD     the teacher resident: each batch's targets come live from the teacher at
                     k = V (the whole vocabulary), so the bucket loss is the full-vocabulary KL
  offline k, tail, T top-k from WORKDIR/cache, k in --ks (none by default), tail bucket / renorm, T in --temperatures
  --extra CACHE:TAIL  any other cache (e.g. a compact one with a sampled tail) with that tail mode,
                      at each T; its logit bytes/token are named in the run
All KD runs use the same --ce-weight (default 1, the setting the demo recommends). Prints one JSON
line per run, then a markdown table.

    python bench/quality.py --workdir runs/demo --temperatures 1,2,4 \
        --extra runs/demo/cache:sampled --extra runs/demo/cache-top64:bucket
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pikv_offline.cache.reader import describe, open_cache  # noqa: E402
from pikv_offline.config import EvalConfig, TrainConfig  # noqa: E402
from pikv_offline.student.evaluate import run as evaluate  # noqa: E402
from pikv_offline.student.train import run as train  # noqa: E402
from pikv_offline.tools.online import online_source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ce-weight", type=float, default=1.0)
    ap.add_argument("--ks", default="", help="k of offline runs on WORKDIR/cache (at most its k: 8 by default)")
    ap.add_argument("--temperatures", default="1,2")
    ap.add_argument("--tails", default="bucket,renorm")
    ap.add_argument("--extra", action="append", default=[], help="CACHE:TAIL, an extra offline run per T")
    args = ap.parse_args()
    w = args.workdir
    cache, heldout, teacher = (os.path.join(w, n) for n in ("cache", "cache-heldout", "teacher"))
    student_cfg = os.path.join(w, "student.json")
    temps = [float(t) for t in args.temperatures.split(",")]

    runs = [("ce only", dict(kd_weight=0.0, ce_weight=1.0), False)]
    runs += [(f"online full KD, T={t:g}", dict(temperature=t, ce_weight=args.ce_weight, tail="bucket"), True)
             for t in temps]
    runs += [(f"offline k={k}, {tail}, T={t:g}", dict(top_k=int(k), tail=tail, temperature=t,
                                                      ce_weight=args.ce_weight), False)
             for t in temps for k in args.ks.split(",") if k for tail in args.tails.split(",")]
    for spec in args.extra:
        path, tail = spec.rsplit(":", 1)
        c = open_cache(path)
        logit_bytes = sum(v for a, v in describe(path)["bytes_per_token"].items() if a.startswith("logits/"))
        drawn_at = ",".join(f"{t:g}" for t in c.tail_temperatures)
        name = f"k={c.top_k}" + (f"+{c.draws} sampled at T={drawn_at}" if c.draws else "") + \
            f" {c.encoding}, {logit_bytes:.0f} B/token"
        runs += [(f"offline {name}, {tail}, T={t:g}", dict(cache=path, tail=tail, temperature=t,
                                                           ce_weight=args.ce_weight), False) for t in temps]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kw, online) in enumerate(runs):
            out = os.path.join(tmp, f"run{i}")
            kw = {"cache": cache, **kw}
            cfg = TrainConfig(student_config=student_cfg, out=out, max_steps=args.steps,
                              batch_size=args.batch_size, lr=args.lr, warmup_steps=20, eval_fraction=0.0,
                              log_every=10**9, seed=0, num_workers=0 if online else 1, **kw)
            res = train(cfg, online_source(cfg, teacher) if online else None)
            ev = evaluate(EvalConfig(cache=heldout, student=os.path.join(out, "final"), eval_fraction=1.0))
            hist = res["history"]
            tps = sum(n for _, n in hist[1:]) / (hist[-1][0] - hist[0][0])
            row = {"bench": "quality", "run": name, "heldout_ce": round(ev["eval_ce"], 4),
                   "heldout_top1": round(ev["eval_top1"], 4), "tokens_per_s": round(tps, 1), "steps": args.steps}
            print(json.dumps(row), flush=True)
            rows.append(row)
    ce = rows[0]["heldout_ce"]
    online = {r["run"].rsplit("T=", 1)[1]: r["heldout_ce"] for r in rows if r["run"].startswith("online")}
    print("\n| run | held-out CE | vs CE only | vs online KD (same T) | top-1 = teacher | tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        t = r["run"].rsplit("T=", 1)[1] if "T=" in r["run"] else None
        vs_online = f"{100 * (r['heldout_ce'] / online[t] - 1):+.2f} %" if t in online else ""
        print(f"| {r['run']} | {r['heldout_ce']:.4f} | {100 * (r['heldout_ce'] / ce - 1):+.2f} % | {vs_online} | "
              f"{r['heldout_top1']:.3f} | {r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
