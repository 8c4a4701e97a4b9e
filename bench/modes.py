"""Quality of train-student's extra modes on the demo: LoRA students and temperature schedules.

    make demo && .venv/bin/python bench/modes.py --workdir runs/demo        (~10 min on 2 cores)

Every run: the demo cache, one process, batch 16 x 128 tokens (the demo's global batch: the same
sequences per step as its 2-rank runs), the same seed and data order, KD + CE (ce-weight 1) unless
named CE only; held-out CE by `pikv eval` on the demo's held-out cache. Two groups:

- schedules: a fresh student (the demo's student.json), 240 steps at lr 3e-3: fixed T = 1, fixed T = 4,
  --temperature-schedule 4:1 (linear) and 4:1:cosine (through the grid 4, 2, 1);
- LoRA: the demo's CE-only student (runs/demo/sweep/kd-weight=0/final) trained on for 240 more steps,
  the whole student (lr 3e-3) or a rank-16 adapter on every linear layer (--lora-rank 16, lr 1e-2),
  each with KD + CE and with CE only.
Prints one JSON line per run, then a markdown table. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    args = ap.parse_args()
    w = os.path.abspath(args.workdir)
    out = os.path.join(w, "modes")
    base = os.path.join(w, "sweep", "kd-weight=0", "final")
    common = ["--cache", os.path.join(w, "cache"), "--max-steps", str(args.steps), "--batch-size", "16",
              "--warmup-steps", "20", "--eval-fraction", "0.02", "--log-every", "10", "--seed", "0",
              "--num-workers", "0"]
    fresh = ["--student-config", os.path.join(w, "student.json"), "--lr", "3e-3", "--ce-weight", "1"]
    runs = {
        "T=1 fixed": fresh,
        "T=4 fixed": fresh + ["--temperature", "4"],
        "T 4->1 linear": fresh + ["--temperature-schedule", "4:1"],
        "T 4->1 cosine": fresh + ["--temperature-schedule", "4:1:cosine"],
        "full, kd+ce": ["--student", base, "--lr", "3e-3", "--ce-weight", "1"],
        "full, ce only": ["--student", base, "--lr", "3e-3", "--ce-weight", "1", "--kd-weight", "0"],
        "lora r16, kd+ce": ["--student", base, "--lr", "1e-2", "--ce-weight", "1", "--lora-rank", "16"],
        "lora r16, ce only": ["--student", base, "--lr", "1e-2", "--ce-weight", "1", "--kd-weight", "0",
                              "--lora-rank", "16"],
    }
    only = [x for x in args.only.split(",") if x]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    pikv = [sys.executable, "-m", "pikv_offline"]
    rows = []
    for name, flags in runs.items():
        if only and name not in only:
            continue
        run = os.path.join(out, name.replace(" ", "_").replace(",", "").replace(">", ""))
        if not os.path.isdir(os.path.join(run, "final")):
            subprocess.run(pikv + ["train-student", *common, *flags, "--out", run, "--resume", "auto"], check=True,
                           env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        p = subprocess.run(pikv + ["eval", "--cache", os.path.join(w, "cache-heldout"), "--student",
                                   os.path.join(run, "final"), "--eval-fraction", "1", "--json"],
                           check=True, env=env, cwd=ROOT, capture_output=True, text=True)
        ev = json.loads(p.stdout.strip().splitlines()[-1])
        metrics = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
        trained = [m for m in metrics if "tokens_per_s" in m]
        row = {"bench": "modes", "run": name, "heldout_ce": round(ev["eval_ce"], 4), "top1": round(ev["eval_top1"], 4),
               "temperatures": sorted({m["temperature"] for m in metrics if "temperature" in m}),
               "tokens_per_s": round(sum(m["tokens_per_s"] for m in trained[1:]) / max(len(trained) - 1, 1), 0)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| run | held-out CE | top-1 = teacher | temperatures used | train tok/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['heldout_ce']:.4f} | {r['top1']:.3f} | {', '.join(f'{t:g}' for t in r['temperatures'])} "
              f"| {r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
