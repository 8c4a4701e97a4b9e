"""The main job on the embedded default: one teacher, dumped once, students trained from the cache, and
the comparison a user makes: against CE alone and against online KD with the teacher resident.

    python -m pikv_offline.tools.demo [--workdir runs/demo]     (what `make demo` runs)

1. builds the corpus from the standard library's docstrings (data is generated, never downloaded);
2. trains a byte-level BPE tokenizer and a small GPT-2 shaped teacher on it until its held-out
   loss is well below a unigram model's (the teacher is saved and reused by later runs);
3. runs `pikv dump-teacher` under torchrun with 2 ranks (gloo on CPU) twice on the training
   docstrings: with its defaults (top-8 + 16 sampled tail ids in bf16, ~55 B/token of logits) and
   with format 4's defaults (top-64 fp16, the tail as one mass, ~119 B/token), and once on the
   held-out docstrings;
4. trains the same small student (2 ranks, same steps, seed and data order) four ways: CE only and
   KD+CE from the default cache (`pikv sweep --grid kd-weight=0,1`), KD+CE from the top-64 cache,
   and KD+CE online with the teacher resident computing all 4,096 log-probs live (tools/online.py);
5. `pikv eval` on the held-out cache gives the table (held-out CE, top-1 agreement with the teacher,
   train tokens/s, logit bytes/token), and results.png plots the CE curves and held-out CE against
   the bytes stored.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

from ..cache.reader import describe, read_root_attrs
from .corpus import write_corpus
from .plot import mean_tokens_per_s, plot_runs, read_metrics
from .toy import make_model, train_lm, train_tokenizer

VOCAB = 4096
SEQ = 128
DEFAULT_CACHE = ()  # dump-teacher's defaults: top-8 + 16 sampled tail ids, bf16 (~55 B/token of logits)
TOP64_CACHE = ("--top-k", "64", "--sampled-tail", "0", "--encoding", "fp16")  # format 4's defaults, ~119 B/token


def _tokens(path: str, tokenizer) -> np.ndarray:
    texts = [json.loads(line)["text"] for line in open(path)]
    ids = tokenizer(texts)["input_ids"]
    eos = tokenizer.eos_token_id
    return np.concatenate([np.asarray(x + [eos], dtype=np.int64) for x in ids])


def unigram_loss(train: np.ndarray, held: np.ndarray, vocab: int) -> float:
    """Held-out cross-entropy (nats/token) of add-one unigram frequencies from the training tokens."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[held].mean())


@torch.no_grad()
def heldout_loss(model, held: np.ndarray, seq: int = SEQ) -> float:
    model.eval()
    n = (len(held) - 1) // seq
    x = torch.from_numpy(held[: n * seq].reshape(n, seq))
    y = torch.from_numpy(held[1: n * seq + 1].reshape(n, seq))
    total = 0.0
    for i in range(0, n, 32):
        logits = model(x[i:i + 32]).logits.float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + 32].flatten(), reduction="sum").item()
    model.train()
    return total / (n * seq)


def train_teacher(out: str, train: np.ndarray, held: np.ndarray, tokenizer, steps: int, seed: int = 0) -> dict:
    """The demo teacher: a small GPT-2 shaped model, saved with the tokenizer in HF form."""
    model = make_model("gpt2", len(tokenizer), hidden=128, layers=4, heads=4, context=512, seed=seed)
    seconds = train_lm(model, train, steps, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"heldout_loss": heldout_loss(model, held), "params": sum(p.numel() for p in model.parameters()),
            "seconds": round(seconds, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--student-steps", type=int, default=240)
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    corpus = os.path.join(args.workdir, "corpus.jsonl")
    held_path = os.path.join(args.workdir, "corpus.heldout.jsonl")
    teacher = os.path.join(args.workdir, "teacher")
    cache = os.path.join(args.workdir, "cache")

    n_train, n_held = write_corpus(corpus, held_path)
    print(f"[1/5] corpus: {n_train} train and {n_held} held-out docstrings from the standard library")
    info_path = os.path.join(teacher, "pikv_teacher.json")
    if os.path.isfile(info_path):
        info = json.load(open(info_path))
        print(f"[2/5] teacher: reusing {teacher} (held-out loss {info['heldout_loss']:.3f}, "
              f"unigram {info['unigram_loss']:.3f})")
    else:
        texts = [json.loads(line)["text"] for line in open(corpus)]
        tokenizer = train_tokenizer(texts, vocab_size=VOCAB)
        train, held = _tokens(corpus, tokenizer), _tokens(held_path, tokenizer)
        print(f"[2/5] teacher: tokenizer of {len(tokenizer)} tokens; {len(train)} train tokens; "
              f"training a GPT-2 shaped teacher for {args.teacher_steps} steps")
        info = train_teacher(teacher, train, held, tokenizer, args.teacher_steps)
        info["unigram_loss"] = unigram_loss(train, held, len(tokenizer))
        json.dump(info, open(info_path, "w"), indent=2)
        print(f"      teacher: {info['params'] / 1e6:.1f}M params, held-out loss {info['heldout_loss']:.3f} "
              f"nats/token vs unigram {info['unigram_loss']:.3f}")
    if not info["heldout_loss"] < info["unigram_loss"] - 0.5:
        sys.exit(f"error: the teacher's held-out loss {info['heldout_loss']:.3f} is not clearly below the "
                 f"unigram model's {info['unigram_loss']:.3f}; delete {teacher} and train longer")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    pikv = torchrun + ["-m", "pikv_offline"]
    top64 = os.path.join(args.workdir, "cache-top64")
    heldout_cache = os.path.join(args.workdir, "cache-heldout")
    print(f"[3/5] pikv dump-teacher with {args.nproc} ranks: the default cache {cache}, a top-64 one {top64} "
          f"and the held-out documents {heldout_cache}")
    before = {c: (read_root_attrs(c) or {}).get("cache_key") for c in (cache, top64)}
    dumps = ((corpus, cache, DEFAULT_CACHE), (corpus, top64, TOP64_CACHE), (held_path, heldout_cache, DEFAULT_CACHE))
    for data, out, settings in dumps:
        # --overwrite: a cache of other inputs (an earlier pikv's demo) is this demo's own output, made again;
        # the same inputs are a cache hit
        subprocess.run(pikv + ["dump-teacher", "--teacher", teacher, "--data", data, "--out", out,
                               "--seq-len", str(SEQ), "--temperatures", "1,2,4", "--batch-size", "16", *settings,
                               "--overwrite"], check=True, env=env)
    if any(k is not None and k != read_root_attrs(c).get("cache_key") for c, k in before.items()):
        print("      a cache was made again (other inputs than the last demo's): training the students again")
        for name in ("sweep", "top64", "online"):
            shutil.rmtree(os.path.join(args.workdir, name), ignore_errors=True)
    sizes = {}
    for c in (cache, top64):
        d = describe(c)
        sizes[c] = (d["bytes_per_token_by_target"]["logits"], d["bytes_per_token_total"])
        print(f"      {os.path.basename(c)}: {_cache_label(c)}: logits {sizes[c][0]:.1f} B/token, total "
              f"{sizes[c][1]:.1f} B/token (pikv inspect {c})")

    student_cfg = os.path.join(args.workdir, "student.json")
    json.dump({"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 384,
               "max_position_embeddings": 512, "tie_word_embeddings": True}, open(student_cfg, "w"))
    # Every student: the same config, seed, steps and data order (both caches hold the same sequences in
    # the same units), KD + CE at T=1. Only where the teacher's targets come from differs.
    train = dict(student_config=student_cfg, max_steps=args.student_steps, batch_size=8, lr=3e-3,
                 warmup_steps=20, eval_fraction=0.02, log_every=10, seed=0, ce_weight=1.0)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in train.items()]
    sweep_dir = os.path.join(args.workdir, "sweep")
    runs = {"ce only (baseline)": os.path.join(sweep_dir, "kd-weight=0"),
            "kd+ce, default cache": os.path.join(sweep_dir, "kd-weight=1"),
            "kd+ce, top-64 cache": os.path.join(args.workdir, "top64"),
            "kd+ce, online (teacher resident)": os.path.join(args.workdir, "online")}
    print(f"[4/5] students, {args.student_steps} steps each on {args.nproc} ranks, same seed and order: "
          "pikv sweep --grid kd-weight=0,1 on the default cache (CE baseline, KD+CE), KD+CE from the top-64 "
          "cache, and online KD+CE with the teacher resident (full vocabulary, live)")
    subprocess.run(pikv + ["sweep", "--cache", cache, *flags, "--out", sweep_dir, "--grid", "kd-weight=0,1"],
                   check=True, env=env)
    if not os.path.isdir(os.path.join(runs["kd+ce, top-64 cache"], "final")):
        shutil.rmtree(runs["kd+ce, top-64 cache"], ignore_errors=True)  # a run killed part way: made again
        subprocess.run(pikv + ["train-student", "--cache", top64, *flags, "--out", runs["kd+ce, top-64 cache"],
                               "--kd-weight=1"], check=True, env=env)
    online = runs["kd+ce, online (teacher resident)"]
    if not os.path.isdir(os.path.join(online, "final")):
        shutil.rmtree(online, ignore_errors=True)
        spec = os.path.join(args.workdir, "online.json")
        json.dump({**train, "cache": cache, "out": online, "kd_weight": 1.0}, open(spec, "w"))
        subprocess.run(torchrun + ["-m", "pikv_offline.tools.online", "--teacher", teacher, "--train-config", spec],
                       check=True, env=env)

    print("[5/5] pikv eval of every student on the held-out documents")
    rows = []
    for name, out in runs.items():
        p = subprocess.run([sys.executable, "-m", "pikv_offline", "eval", "--cache", heldout_cache, "--student",
                            os.path.join(out, "final"), "--eval-fraction", "1", "--json"],
                           check=True, env=env, capture_output=True, text=True)
        ev = json.loads(p.stdout.strip().splitlines()[-1])
        source = top64 if "top-64" in name else cache if "default" in name else None
        rows.append({"run": name, "targets": _cache_label(source) if source else
                     ("none (labels only)" if "ce only" in name else "teacher live, all 4,096 ids"),
                     "logit_bytes_per_token": sizes[source][0] if source else 0.0,
                     "heldout_ce": ev["eval_ce"], "perplexity": ev["eval_ppl"], "top1": ev["eval_top1"],
                     "tokens_per_s": mean_tokens_per_s(read_metrics(out)[0]) or 0.0})
    base = rows[0]["heldout_ce"]
    print(f"\nheld-out docstrings ({ev['eval_tokens']} tokens), teacher held-out CE {info['heldout_loss']:.3f}; "
          f"one seed, the same data order for every run:")
    print(f"| {'run':<32} | {'teacher targets':<34} | logit B/token | held-out CE | vs CE only | top-1 = teacher "
          "| train tok/s |")
    print(f"|{'-' * 34}|{'-' * 36}|---------------|-------------|------------|-----------------|-------------|")
    for r in rows:
        stored = f"{r['logit_bytes_per_token']:13.1f}" if "online" not in r["run"] else f"{'- (live)':>13}"
        print(f"| {r['run']:<32} | {r['targets']:<34} | {stored} | {r['heldout_ce']:11.3f} "
              f"| {100 * (r['heldout_ce'] / base - 1):+9.2f}% | {r['top1']:15.3f} | {r['tokens_per_s']:11.0f} |")
    json.dump(rows, open(os.path.join(args.workdir, "results.json"), "w"), indent=2)
    png = plot_runs(runs, os.path.join(args.workdir, "results.png"),
                    title="one teacher, one dump: students from the caches vs online KD",
                    heldout={r["run"]: r["heldout_ce"] for r in rows},
                    bytes_per_token={r["run"]: r["logit_bytes_per_token"] for r in rows if "ce only" not in r["run"]})
    print(f"wrote {os.path.join(args.workdir, 'results.json')} and {png}")


def _cache_label(path: str) -> str:
    lg = read_root_attrs(path)["targets"]["logits"]
    tail = f" + {lg['sampled_tail']} sampled" if lg["sampled_tail"] else " + tail mass"
    return f"top-{lg['top_k']}{tail}, {lg['encoding']}"


if __name__ == "__main__":
    main()
