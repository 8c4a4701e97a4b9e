"""Quality of several teachers on the demo: KD to a mixture of two caches against each teacher alone.

    make demo && .venv/bin/python bench/teachers.py --workdir runs/demo        (~10 min on 2 cores)

Teacher A is the demo's (GPT-2 shape, runs/demo/teacher). Teacher B is made here: a Llama-shaped model
of the same tokenizer, another seed, trained the same number of steps on the same corpus, and dumped with
the demo's settings on the same data (runs/demo/teacher-b, runs/demo/cache-b). Every student: the demo's
student.json, one process, 240 steps of 16 x 128 tokens, lr 3e-3, KD + CE (ce-weight 1) at T=1, the same
seed and data order (the caches hold the same sequences); held-out CE by `pikv eval` on the demo's
held-out cache. Runs: A alone, B alone, A + B at 0.5/0.5, and CE only. Prints JSON lines, then a table.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pikv_offline.tools import demo  # noqa: E402


def make_teacher_b(w: str, steps: int) -> dict:
    from transformers import AutoTokenizer

    from pikv_offline.tools.toy import make_model, train_lm

    out = os.path.join(w, "teacher-b")
    info_path = os.path.join(out, "pikv_teacher.json")
    if os.path.isfile(info_path):
        return json.load(open(info_path))
    tok = AutoTokenizer.from_pretrained(os.path.join(w, "teacher"))
    train = demo._tokens(os.path.join(w, "corpus.jsonl"), tok)
    held = demo._tokens(os.path.join(w, "corpus.heldout.jsonl"), tok)
    model = make_model("llama", len(tok), hidden=128, layers=4, heads=4, context=512, seed=1)
    seconds = train_lm(model, train, steps, seed=1, log_every=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"heldout_loss": demo.heldout_loss(model, held), "seconds": round(seconds, 1),
            "params": sum(p.numel() for p in model.parameters())}
    json.dump(info, open(info_path, "w"), indent=2)
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--teacher-steps", type=int, default=400)
    args = ap.parse_args()
    w = os.path.abspath(args.workdir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    pikv = [sys.executable, "-m", "pikv_offline"]
    info_a = json.load(open(os.path.join(w, "teacher", "pikv_teacher.json")))
    info_b = make_teacher_b(w, args.teacher_steps)
    print(json.dumps({"bench": "teachers", "teacher_a_heldout_ce": round(info_a["heldout_loss"], 4),
                      "teacher_b_heldout_ce": round(info_b["heldout_loss"], 4)}), flush=True)
    cache_a, cache_b = os.path.join(w, "cache"), os.path.join(w, "cache-b")
    subprocess.run(pikv + ["dump-teacher", "--teacher", os.path.join(w, "teacher-b"), "--data",
                           os.path.join(w, "corpus.jsonl"), "--out", cache_b, "--seq-len", str(demo.SEQ),
                           "--temperatures", "1,2,4", "--batch-size", "16", *demo.DEFAULT_CACHE],
                   check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    common = ["--student-config", os.path.join(w, "student.json"), "--lr", "3e-3", "--ce-weight", "1",
              "--max-steps", str(args.steps), "--batch-size", "16", "--warmup-steps", "20", "--eval-fraction", "0.02",
              "--log-every", "10", "--seed", "0", "--num-workers", "0"]
    runs = {"teacher A alone": ["--cache", cache_a], "teacher B alone": ["--cache", cache_b],
            "A + B, 0.5/0.5": ["--cache", cache_a, "--cache", cache_b, "--teacher-weights", "0.5,0.5"],
            "CE only": ["--cache", cache_a, "--kd-weight", "0"]}
    out = os.path.join(w, "teachers")
    rows = []
    for name, flags in runs.items():
        run = os.path.join(out, name.replace(" ", "_").replace(",", "").replace("/", "-").replace("+", "and"))
        if not os.path.isdir(os.path.join(run, "final")):
            subprocess.run(pikv + ["train-student", *common, *flags, "--out", run, "--resume", "auto"], check=True,
                           env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        p = subprocess.run(pikv + ["eval", "--cache", os.path.join(w, "cache-heldout"), "--student",
                                   os.path.join(run, "final"), "--eval-fraction", "1", "--json"],
                           check=True, env=env, cwd=ROOT, capture_output=True, text=True)
        ev = json.loads(p.stdout.strip().splitlines()[-1])
        row = {"bench": "teachers", "run": name, "heldout_ce": round(ev["eval_ce"], 4)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\nteachers' own held-out CE: A {info_a['heldout_loss']:.3f}, B {info_b['heldout_loss']:.3f}")
    print("\n| run | held-out CE |\n|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['heldout_ce']:.4f} |")


if __name__ == "__main__":
    main()
