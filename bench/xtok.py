"""Quality of cross-tokenizer KD on the demo: a student with its own tokenizer, exact-match KD + CE and ULD + CE
against CE only.

    make demo && .venv/bin/python bench/xtok.py --workdir runs/demo        (~13 min on 2 cores)

The teacher is the demo's (its 4,096-token byte-level BPE; the demo cache). The student gets its own
tokenizer, a 2,048-token byte-level BPE trained here on the same corpus (runs/demo/xtok/tokenizer), and the
demo's student.json with that vocabulary. Every run: one process, 240 steps of 16 sequences (the cache's
128 teacher tokens each, retokenized), lr 3e-3, the same seed and data order, ce-weight 1; CE only, or CE
plus exact-match KD (--cross-loss match) or ULD (--cross-loss uld, kd-weight 1 and 0.1) at T=1. Also
printed: the share of student positions aligned with a teacher position, and the share of the teacher's
head probability there on ids the student's vocabulary spells the same. Held-out figures on the demo's
held-out documents in the student's own tokens: CE per student token and bits per byte (comparable with
the teacher's). One seed. Prints JSON lines, then a table.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pikv_offline.tools import demo  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pikv_offline.tools.toy import train_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--vocab", type=int, default=2048)
    args = ap.parse_args()
    w = os.path.abspath(args.workdir)
    out = os.path.join(w, "xtok")
    tok_dir = os.path.join(out, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        texts = [json.loads(line)["text"] for line in open(os.path.join(w, "corpus.jsonl"))]
        train_tokenizer(texts, vocab_size=args.vocab).save_pretrained(tok_dir)
    s_tok = AutoTokenizer.from_pretrained(tok_dir)
    student = json.load(open(os.path.join(w, "student.json")))
    student["vocab_size"] = len(s_tok)
    s_cfg = os.path.join(out, "student.json")
    json.dump(student, open(s_cfg, "w"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    pikv = [sys.executable, "-m", "pikv_offline"]
    common = ["--cache", os.path.join(w, "cache"), "--student-config", s_cfg, "--student-tokenizer", tok_dir,
              "--lr", "3e-3", "--ce-weight", "1", "--max-steps", str(args.steps), "--batch-size", "16",
              "--warmup-steps", "20", "--eval-fraction", "0.02", "--log-every", "10", "--seed", "0",
              "--num-workers", "0"]
    held_text = [json.loads(line)["text"] for line in open(os.path.join(w, "corpus.heldout.jsonl"))]
    held = demo._tokens(os.path.join(w, "corpus.heldout.jsonl"), s_tok)
    n_bytes = sum(len(t.encode("utf-8")) for t in held_text)
    t_tok = AutoTokenizer.from_pretrained(os.path.join(w, "teacher"))
    t_held = demo._tokens(os.path.join(w, "corpus.heldout.jsonl"), t_tok)
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(w, "teacher"))
    t_ce = demo.heldout_loss(teacher, t_held)
    # bits per byte over the tokens scored (windows of 128): CE x tokens / bytes / ln 2, the bytes pro rata
    scored = lambda stream: (len(stream) - 1) // demo.SEQ * demo.SEQ  # noqa: E731
    bpb = lambda ce, stream: ce * scored(stream) / (n_bytes * scored(stream) / len(stream)) / math.log(2)  # noqa
    print(json.dumps({"bench": "xtok", "run": "teacher (own tokenizer)", "heldout_ce": round(t_ce, 4),
                      "bits_per_byte": round(bpb(t_ce, t_held), 4), "vocab": len(t_tok)}), flush=True)
    rows = []
    from pikv_offline.cache.reader import open_cache
    from pikv_offline.student import data as D
    from pikv_offline.student.xtok import Retokenizer

    cache = open_cache(os.path.join(w, "cache"))
    rt, aligned, positions = Retokenizer(cache.tokenizer_path, tok_dir, 4 * cache.seq_len), 0, 0  # untruncated
    raw = D.read_rows(cache, list(range(64)), ("input_ids", "loss_mask"))
    for ids, mask in zip(raw["input_ids"], raw["loss_mask"]):
        s_ids, s_mask, pos = rt(ids.astype("int64"), mask)
        aligned += int((pos[:-1] >= 0).sum())
        positions += int((s_ids != (s_tok.pad_token_id if s_tok.pad_token_id is not None else -1)).sum()) - 1
    # the teacher's head mass at the aligned positions, and the part of it on ids the student spells the same
    plan = D.plan_targets(cache, None, 1.0, "bucket", "forward_kl")
    batch = D.cross_batch(D.to_batch(D.read_rows(cache, list(range(64))), cache.encoding, plan), rt)
    p = batch.head_logprobs[batch.aligned].exp()
    head_mass, matched_mass = float(p.sum()), float((p * (batch.head_ids[batch.aligned] >= 0)).sum())
    print(json.dumps({"bench": "xtok", "aligned_fraction": round(aligned / positions, 4),
                      "student_tokens_per_teacher_token": round(positions / (64 * (cache.seq_len - 1)), 4),
                      "head_mass_matched": round(matched_mass / head_mass, 4)}), flush=True)
    runs = {"match + CE": [], "ULD + CE": ["--cross-loss", "uld"],
            "ULD x 0.1 + CE": ["--cross-loss", "uld", "--kd-weight", "0.1"], "CE only": ["--kd-weight", "0"]}
    for name, flags in runs.items():
        run = os.path.join(out, name.replace(" ", "").replace("+", "_").replace(".", ""))
        if not os.path.isdir(os.path.join(run, "final")):
            subprocess.run(pikv + ["train-student", *common, *flags, "--out", run, "--resume", "auto"], check=True,
                           env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        model = AutoModelForCausalLM.from_pretrained(os.path.join(run, "final"))
        ce = demo.heldout_loss(model, held)
        row = {"bench": "xtok", "run": name, "heldout_ce": round(ce, 4), "bits_per_byte": round(bpb(ce, held), 4),
               "vocab": len(s_tok)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| student (own 2,048-token tokenizer) | held-out CE / token | bits / byte |\n|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['heldout_ce']:.4f} | {r['bits_per_byte']:.4f} |")


if __name__ == "__main__":
    main()
