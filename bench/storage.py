"""Storage: bytes/token of the logit targets against their fidelity, per encoding, k and sampled tail.

    python bench/storage.py --workdir runs/demo        (after `make demo`: its teacher, corpus, student)

For every setting it dumps the demo teacher over the same sequences (`pikv dump-teacher` in
process), then runs `pikv verify --recompute` on the first sequences with the demo's KD+CE student
and reports, for the loss mode the setting trains with (bucket without a tail,
sampled with one): the mean KL(teacher || cache) over its buckets and the angle between the
student's gradient under that mode and under full-vocabulary KD, at every grid temperature (1, 2, 4).
A sampled setting is dumped once per --proposals entry: the temperatures its tail draws at (`1`: T=1
alone, format 4's draws; `grid`: each grid T once, the default). Prints one JSON line per setting,
then a markdown table. Not a test.

    python bench/storage.py --workdir runs/demo --encodings bf16 --ks 8,16,24,32 --tails 0,16 --pure-tails ""
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pikv_offline.config import VerifyConfig  # noqa: E402
from pikv_offline.tools.fidelity import recompute  # noqa: E402
from pikv_offline.config import DumpConfig  # noqa: E402
from pikv_offline.teacher import dump as dump_mod  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--student", default=None, help="default: WORKDIR/sweep/kd-weight=1/final (the demo's KD+CE run)")
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--recompute", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--encodings", default="fp16,bf16")
    ap.add_argument("--ks", default="8,16,32,64,128")
    ap.add_argument("--tails", default="0,8,16,32")
    ap.add_argument("--pure-tails", default="16,32,64", help="draws of --top-k 0 (pure sampling) settings")
    ap.add_argument("--proposals", default="1,grid", help="tail proposals of sampled settings: 1 and/or grid")
    args = ap.parse_args()
    w = args.workdir
    teacher, data = os.path.join(w, "teacher"), os.path.join(w, "corpus.jsonl")
    student = args.student or os.path.join(w, "sweep", "kd-weight=1", "final")
    grid = (1.0, 2.0, 4.0)
    proposals = {"1": (1.0,), "grid": grid}
    base = [(e, int(k), int(n)) for e in args.encodings.split(",") for k in args.ks.split(",")
            for n in args.tails.split(",")]
    base += [(e, 0, int(n)) for e in args.encodings.split(",") for n in args.pure_tails.split(",") if n]
    settings = [(e, k, n, p) for e, k, n in base for p in (args.proposals.split(",") if n else ["-"])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (enc, k, n, prop) in enumerate(settings):
            out = os.path.join(tmp, f"c{i}")
            res = dump_mod.run(DumpConfig(teacher=teacher, data=data, out=out, seq_len=args.seq_len, top_k=k,
                                          sampled_tail=n, encoding=enc, temperatures=grid,
                                          tail_temperatures=proposals.get(prop), max_sequences=args.sequences,
                                          batch_size=16))
            fid = recompute(VerifyConfig(cache=out, recompute=args.recompute, teacher=teacher, student=student))
            mode = "sampled" if n else "bucket"
            by = {(r["mode"], r["T"]): r for r in fid["rows"]}
            bpt = res["bytes_per_token"]
            row = {"bench": "storage", "encoding": enc, "top_k": k, "sampled_tail": n, "proposal": prop, "mode": mode,
                   "bytes_per_token_logits": round(sum(v for a, v in bpt.items() if a.startswith("logits/")), 1),
                   "bytes_per_token_total": round(sum(bpt.values()), 1),
                   **{f"{key}_T{t:g}": float(f"{by[mode, t][key]:.3g}")
                      for t in grid for key in ("kl", "angle_deg", "max_logprob_err")}}
            if not n and k:
                row["renorm_angle_deg_T1"] = float(f"{by['renorm', 1.0]['angle_deg']:.3g}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| encoding | k | sampled tail | proposal | loss | B/token (logits) | grad angle T=1 | T=2 | T=4 "
          "| KL(teacher‖cache) T=1 | T=4 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["encoding"], r["bytes_per_token_logits"])):
        print(f"| {r['encoding']} | {r['top_k']} | {r['sampled_tail'] or '—'} | {r['proposal']} | {r['mode']} | "
              f"{r['bytes_per_token_logits']:.1f} | {r['angle_deg_T1']:.1f}° | {r['angle_deg_T2']:.1f}° | "
              f"{r['angle_deg_T4']:.1f}° | {r['kl_T1']:.1e} | {r['kl_T4']:.1e} |")


if __name__ == "__main__":
    main()
