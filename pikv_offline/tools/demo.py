"""The main job on the embedded default: a small real teacher, dumped once, students trained from it.

    python -m pikv_offline.tools.demo [--workdir runs/demo]     (what `make demo` runs)

1. builds the corpus from the standard library's docstrings (data is generated, never downloaded);
2. trains a byte-level BPE tokenizer and a small GPT-2 shaped teacher on it until its held-out
   loss is well below a unigram model's (the teacher is saved and reused by later runs);
3. runs `pikv dump-teacher` under torchrun with 2 ranks (gloo on CPU) on the training docstrings,
   and once more on the held-out docstrings (the evaluation set), then `pikv inspect`;
4. `pikv sweep --grid kd-weight=0,1 --ce-weight 1` trains the same small student (2 ranks, same steps
   and seed) as the CE-only baseline and with top-k KD + CE, then one KD-only run for contrast;
   `pikv eval` on the held-out cache gives the table (held-out CE, perplexity, top-1 agreement with
   the teacher, tokens/s), and results.png plots every run's CE curve and held-out CE.
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

from ..cache.reader import read_root_attrs
from .corpus import write_corpus
from .plot import mean_tokens_per_s, plot_runs, read_metrics
from .toy import make_model, train_lm, train_tokenizer

VOCAB = 4096
SEQ = 128


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
    ap.add_argument("--student-steps", type=int, default=300)
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    corpus = os.path.join(args.workdir, "corpus.jsonl")
    held_path = os.path.join(args.workdir, "corpus.heldout.jsonl")
    teacher = os.path.join(args.workdir, "teacher")
    cache = os.path.join(args.workdir, "cache")

    n_train, n_held = write_corpus(corpus, held_path)
    print(f"[1/4] corpus: {n_train} train and {n_held} held-out docstrings from the standard library")
    info_path = os.path.join(teacher, "pikv_teacher.json")
    if os.path.isfile(info_path):
        info = json.load(open(info_path))
        print(f"[2/4] teacher: reusing {teacher} (held-out loss {info['heldout_loss']:.3f}, "
              f"unigram {info['unigram_loss']:.3f})")
    else:
        texts = [json.loads(line)["text"] for line in open(corpus)]
        tokenizer = train_tokenizer(texts, vocab_size=VOCAB)
        train, held = _tokens(corpus, tokenizer), _tokens(held_path, tokenizer)
        print(f"[2/4] teacher: tokenizer of {len(tokenizer)} tokens; {len(train)} train tokens; "
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
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
                "-m", "pikv_offline"]
    heldout_cache = os.path.join(args.workdir, "cache-heldout")
    print(f"[3/4] pikv dump-teacher with {args.nproc} ranks -> {cache} (and {heldout_cache})")
    before = (read_root_attrs(cache) or {}).get("cache_key")
    for data, out in ((corpus, cache), (held_path, heldout_cache)):
        # --overwrite: a cache of other inputs (an earlier pikv's demo) is this demo's own output, made again;
        # the same inputs are a cache hit
        subprocess.run(torchrun + ["dump-teacher", "--teacher", teacher, "--data", data, "--out", out,
                                   "--seq-len", str(SEQ), "--top-k", "64", "--temperatures", "1,2,4",
                                   "--batch-size", "16", "--overwrite"], check=True, env=env)
    if before is not None and before != read_root_attrs(cache).get("cache_key"):
        print("      the cache was made again (other inputs than the last demo's): training the students again")
        for name in ("sweep", "kd-only"):
            shutil.rmtree(os.path.join(args.workdir, name), ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pikv_offline", "inspect", cache], check=True)

    student_cfg = os.path.join(args.workdir, "student.json")
    json.dump({"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 384,
               "max_position_embeddings": 512, "tie_word_embeddings": True}, open(student_cfg, "w"))
    # KD alone constrains only the total teacher mass outside the top-k, not its shape; with this small,
    # high-entropy teacher (~39% of its mass lies outside the top-64) the hard-label CE term is what
    # shapes the student's tail, so KD+CE is the recommended run and KD-only is shown for contrast.
    common = ["--cache", cache, "--student-config", student_cfg, "--max-steps", str(args.student_steps),
              "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "20", "--eval-fraction", "0.02",
              "--log-every", "10", "--seed", "0"]
    sweep_dir = os.path.join(args.workdir, "sweep")
    runs = {"kd+ce (top-64 + tail, T=1)": os.path.join(sweep_dir, "kd-weight=1"),
            "kd only": os.path.join(args.workdir, "kd-only"),
            "ce only (baseline)": os.path.join(sweep_dir, "kd-weight=0")}
    print(f"[4/4] pikv sweep --grid kd-weight=0,1 --ce-weight 1 (CE baseline and KD+CE), then a KD-only run; "
          f"{args.student_steps} steps each, {args.nproc} ranks")
    subprocess.run(torchrun + ["sweep", *common, "--out", sweep_dir, "--grid", "kd-weight=0,1", "--ce-weight", "1"],
                   check=True, env=env)
    if not os.path.isdir(os.path.join(runs["kd only"], "final")):
        subprocess.run(torchrun + ["train-student", *common, "--out", runs["kd only"], "--kd-weight", "1",
                                   "--ce-weight", "0"], check=True, env=env)
    rows = []
    for name, out in runs.items():
        p = subprocess.run([sys.executable, "-m", "pikv_offline", "eval", "--cache", heldout_cache, "--student",
                            os.path.join(out, "final"), "--eval-fraction", "1", "--json"],
                           check=True, env=env, capture_output=True, text=True)
        ev = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append((name, ev["eval_ce"], ev["eval_ppl"], ev["eval_top1"], mean_tokens_per_s(read_metrics(out)[0]) or 0))
    print(f"\nheld-out docstrings ({ev['eval_tokens']} tokens), teacher held-out CE {info['heldout_loss']:.3f}:")
    print(f"| {'run':<26} | held-out CE | perplexity | top-1 = teacher | train tok/s |")
    print(f"|{'-' * 28}|-------------|------------|-----------------|-------------|")
    for name, ce, ppl, top1, tps in rows:
        print(f"| {name:<26} | {ce:11.3f} | {ppl:10.1f} | {top1:15.3f} | {tps:11.0f} |")
    json.dump([dict(zip(("run", "heldout_ce", "perplexity", "top1", "tokens_per_s"), r)) for r in rows],
              open(os.path.join(args.workdir, "results.json"), "w"), indent=2)
    png = plot_runs(runs, os.path.join(args.workdir, "results.png"),
                    title="students from one cache (held-out: the cache's own held-out share)")
    print(f"wrote {os.path.join(args.workdir, 'results.json')} and {png}")


if __name__ == "__main__":
    main()
