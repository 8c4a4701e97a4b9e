"""Rich targets: what hidden-state and KV targets cost to store, how much each encoding loses, and
whether hidden-state distillation and a student made from the teacher's layers help.

    python bench/rich.py --workdir runs/demo        (after `make demo`: its teacher, corpora, student config)

Storage: the same sequences dumped with every layer's hidden states and keys/values in fp16, bf16
and int8, against a logits-only dump: bytes/token per target, dump tokens/s, and each encoding's
measured error (max error over its group's absmax, relative RMS error) over every stored value.

Quality: one cache (top-64, T=1, hidden states of teacher layers 1 and 3 in bf16) and students
trained 300 steps with KD+CE, evaluated on the held-out cache:
  fresh student                  the demo's student config, random init
  fresh student + feature loss   plus --hidden-weight (teacher layers 1, 3 -> student layers 0, 1)
  make-student 0,2               `pikv make-student --keep-layers 0,2` (half the teacher's layers)
  make-student 0,2 + feature     plus --hidden-weight with the same default map
Prints one JSON line per measurement, then markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pikv_offline.cache.reader import describe  # noqa: E402
from pikv_offline.config import DumpConfig, EvalConfig, TrainConfig, parse_targets  # noqa: E402
from pikv_offline.student.evaluate import run as evaluate  # noqa: E402
from pikv_offline.student.train import run as train  # noqa: E402
from pikv_offline.teacher.dump import run as dump  # noqa: E402


def storage(args, teacher: str, corpus: str, tmp: str) -> list[dict]:
    rows = []
    for enc in ("none", "fp16", "bf16", "int8"):
        targets = () if enc == "none" else parse_targets([f"hidden@{enc}", f"kv@{enc}"])
        out = os.path.join(tmp, f"storage-{enc}")
        res = dump(DumpConfig(sampled_tail=0, encoding="fp16", teacher=teacher, data=corpus, out=out, seq_len=128, top_k=64, temperatures=(1.0,),
                              max_sequences=args.storage_seqs, batch_size=16, targets=targets))
        info = describe(out)
        by = info["bytes_per_token_by_target"]
        layers = [k for k in by if k.startswith("hidden:")]
        row = {"bench": "rich-storage", "encoding": enc, "dump_tokens_per_s": res["dump_tokens_per_s"],
               "logits_B_per_token": by["logits"],
               "hidden_B_per_token_per_layer": round(sum(by[k] for k in layers) / max(len(layers), 1), 1),
               "kv_B_per_token_per_layer": round(sum(v for k, v in by.items() if k.startswith("kv:"))
                                                 / max(len(layers), 1), 1),
               "total_B_per_token": info["bytes_per_token_total"]}
        for kind in ("hidden", "kv"):
            errs = [e for name, e in info["encoding_errors"].items() if name.startswith(kind)]
            if errs:
                row[f"{kind}_max_error_over_absmax"] = max(e["max_error_over_absmax"] for e in errs)
                row[f"{kind}_relative_rms_error"] = max(e["relative_rms_error"] for e in errs)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def quality(args, teacher: str, corpus: str, held: str, student_cfg: str, tmp: str) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pikv_offline.tools.make_student import make

    cache, heldout = os.path.join(tmp, "cache-hidden"), os.path.join(tmp, "cache-heldout")
    dump(DumpConfig(sampled_tail=0, encoding="fp16", teacher=teacher, data=corpus, out=cache, seq_len=128, top_k=64, temperatures=(1.0,),
                    batch_size=16, targets=parse_targets(["hidden:1,3@bf16"])))
    dump(DumpConfig(sampled_tail=0, encoding="fp16", teacher=teacher, data=held, out=heldout, seq_len=128, top_k=64, temperatures=(1.0,),
                    batch_size=16))
    made = os.path.join(tmp, "student-0-2")
    make(AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32), [0, 2]).save_pretrained(made)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(made)
    runs = [("fresh student", dict(student_config=student_cfg)),
            ("fresh student + feature", dict(student_config=student_cfg, hidden_weight=args.hidden_weight)),
            ("make-student 0,2", dict(student=made)),
            ("make-student 0,2 + feature", dict(student=made, hidden_weight=args.hidden_weight))]
    rows = []
    for seed in args.seeds:
        for i, (name, kw) in enumerate(runs):
            out = os.path.join(tmp, f"run{i}-seed{seed}")
            res = train(TrainConfig(cache=cache, out=out, max_steps=args.steps, batch_size=16, lr=3e-3,
                                    warmup_steps=20, eval_fraction=0.0, log_every=10**9, seed=seed, ce_weight=1.0,
                                    **kw))
            ev = evaluate(EvalConfig(cache=heldout, student=os.path.join(out, "final"), eval_fraction=1.0))
            hist = res["history"]
            row = {"bench": "rich-quality", "run": name, "seed": seed, "heldout_ce": round(ev["eval_ce"], 4),
                   "heldout_top1": round(ev["eval_top1"], 4),
                   "last_feature": round(res["last"].get("hidden", 0), 5),
                   "tokens_per_s": round(sum(n for _, n in hist[1:]) / (hist[-1][0] - hist[0][0]), 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--storage-seqs", type=int, default=128)
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--seeds", default="0", help="Seeds of the quality runs (init and data order), e.g. 0,1,2")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-storage", action="store_true")
    args = ap.parse_args()
    args.seeds = [int(x) for x in args.seeds.split(",")]
    w = args.workdir
    teacher, corpus, held = (os.path.join(w, n) for n in ("teacher", "corpus.jsonl", "corpus.heldout.jsonl"))
    with tempfile.TemporaryDirectory() as tmp:
        st = [] if args.skip_storage else storage(args, teacher, corpus, tmp)
        q = [] if args.skip_quality else quality(args, teacher, corpus, held, os.path.join(w, "student.json"), tmp)
    if st:
        print("\n| encoding | hidden B/token/layer | kv B/token/layer | max err / absmax (hidden, kv) | rel. RMS err "
              "(hidden, kv) | dump tok/s |")
        print("|---|---|---|---|---|---|")
    for r in st:
        err = (f"{r['hidden_max_error_over_absmax']:.2e}, {r['kv_max_error_over_absmax']:.2e} | "
               f"{r['hidden_relative_rms_error']:.2e}, {r['kv_relative_rms_error']:.2e}") if r["encoding"] != "none" \
            else "— | —"
        print(f"| {r['encoding']} | {r['hidden_B_per_token_per_layer']} | {r['kv_B_per_token_per_layer']} | {err} | "
              f"{r['dump_tokens_per_s']:.0f} |")
    if q:
        print(f"\n| run (KD+CE, {args.steps} steps) | held-out CE, seeds {args.seeds} | mean | top-1 = teacher (mean) "
              "| tok/s (mean) |")
        print("|---|---|---|---|---|")
        for name in dict.fromkeys(r["run"] for r in q):
            rs = [r for r in q if r["run"] == name]
            ces = ", ".join(f"{r['heldout_ce']:.4f}" for r in rs)
            mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("heldout_ce", "heldout_top1", "tokens_per_s")}
            print(f"| {name} | {ces} | {mean['heldout_ce']:.4f} | {mean['heldout_top1']:.3f} | "
                  f"{mean['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
