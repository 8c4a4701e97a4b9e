"""Storage at a realistic vocabulary: a >= 32k BPE teacher trained here, bytes/token per array per setting.

    python bench/bpe_storage.py --workdir runs/bpe32k [--vocab 32768 --teacher-steps 800 --max-mb 64]

The largest text every machine of ours has: the standard library's docstrings (tools/corpus.py) plus
the operating system's documentation (the English man pages, roff markup stripped, and the text
files under /usr/share/doc). On it: a byte-level BPE tokenizer of --vocab ids, a GPT-2-shaped teacher
trained with plain next-token loss and, for the gradient angles, a small CE-only student. Then, over
the same held-in sequences, one `pikv dump-teacher` per setting (in process) reports bytes/token of
every array, and `pikv verify --recompute` the KL(teacher || cache) and the angle between the
student's gradient under the setting's loss and under full-vocabulary KD at T = 1, 2, 4. Prints one
JSON line per setting, then a markdown table. Not a test: it trains for minutes.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pikv_offline.config import DumpConfig, VerifyConfig  # noqa: E402
from pikv_offline.teacher import dump as dump_mod  # noqa: E402
from pikv_offline.tools.corpus import docstrings, is_heldout  # noqa: E402
from pikv_offline.tools.fidelity import recompute  # noqa: E402

# (label, top_k, sampled draws, encoding): the default, two compact settings, and format 4's default.
SETTINGS = (("default", 8, 16, "bf16"), ("compact 8+8", 8, 8, "bf16"), ("compact 4+8", 4, 8, "bf16"),
            ("top-64 fp16 (bucket)", 64, 0, "fp16"))

_ROFF_DROP = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\(..|\\\[[^\]]*\]|\\[&|^%:,/]|\\s[-+]?\d")
_ROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB", "TP", "IP", "Nm", "Nd"}


def man_text(raw: str) -> str:
    """A man page's prose: macro lines dropped except those carrying text (headings, fonts), escapes removed."""
    lines = []
    for line in raw.splitlines():
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if not parts or parts[0] not in _ROFF_TEXT_MACROS or len(parts) < 2:
                if lines and lines[-1]:
                    lines.append("")  # a paragraph break where a layout macro stood
                continue
            line = parts[1].replace('"', "")
        line = line.replace("\\-", "-").replace("\\(em", "-").replace("\\(en", "-").replace("\\e", "\\")
        lines.append(_ROFF_DROP.sub("", line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _read(path: str) -> str | None:
    try:
        data = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        return None if b"\0" in data[:4096] else data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def documents(max_chars: int, doc_chars: int = 4000):
    """Docstrings, then man pages, then /usr/share/doc, cut into documents of <= doc_chars at paragraphs."""
    def cut(text):
        buf = ""
        for para in text.split("\n\n"):
            if buf and len(buf) + len(para) > doc_chars:
                yield buf
                buf = ""
            buf = f"{buf}\n\n{para}" if buf else para
        if len(buf) >= 80:
            yield buf

    def sources():
        yield from docstrings()
        for p in sorted(glob.glob("/usr/share/man/man*/*")):
            raw = _read(p)
            if raw:
                yield man_text(raw)
        for p in sorted(glob.glob("/usr/share/doc/**/*", recursive=True)):
            if os.path.isfile(p) and not p.endswith((".html", ".htm", ".pdf", ".png", ".svg", ".js", ".css")):
                raw = _read(p)
                if raw:
                    yield raw

    total = 0
    for text in sources():
        for doc in cut(text):
            yield doc
            total += len(doc)
            if total >= max_chars:
                return


def build(args) -> dict:
    import numpy as np
    import torch

    from pikv_offline.tools.demo import _tokens, heldout_loss, unigram_loss
    from pikv_offline.tools.toy import make_model, train_lm, train_tokenizer

    w = args.workdir
    os.makedirs(w, exist_ok=True)
    corpus, held_path = os.path.join(w, "corpus.jsonl"), os.path.join(w, "corpus.heldout.jsonl")
    teacher, student = os.path.join(w, "teacher"), os.path.join(w, "student")
    info_path = os.path.join(w, "info.json")
    if os.path.isfile(info_path):
        return json.load(open(info_path))
    chars = train_chars = 0
    with open(corpus, "w") as ft, open(held_path, "w") as fh:
        for doc in documents(int(args.max_mb * 1e6)):
            f = fh if is_heldout(doc) else ft
            f.write(json.dumps({"text": doc}) + "\n")
            chars += len(doc)
            train_chars += 0 if f is fh else len(doc)
    texts = [json.loads(line)["text"] for line in open(corpus)]
    tok = train_tokenizer(texts, vocab_size=args.vocab, chat_template=False)
    del texts
    train, held = _tokens(corpus, tok), _tokens(held_path, tok)
    held = held[: 200_000]  # a bounded held-out evaluation
    info = {"corpus_chars": chars, "train_chars": train_chars, "vocab": len(tok), "train_tokens": int(len(train)),
            "heldout_tokens": int(len(held)), "unigram_heldout_ce": round(unigram_loss(train, held, len(tok)), 4)}
    print(json.dumps({"bench": "bpe_storage", "stage": "corpus", **info}), flush=True)
    model = make_model("gpt2", len(tok), hidden=args.teacher_hidden, layers=4, heads=4, context=512, seed=0)
    info["teacher_seconds"] = round(train_lm(model, train, args.teacher_steps, seed=0, log_every=200), 1)
    info["teacher_params"] = sum(p.numel() for p in model.parameters())
    info["teacher_heldout_ce"] = round(heldout_loss(model, held), 4)
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    # The angles need a student's distribution; a small CE-only one (its own training, not the KD it measures).
    small = make_model("gpt2", len(tok), hidden=64, layers=2, heads=4, context=512, seed=1)
    train_lm(small, train, args.student_steps, seed=1, log_every=0)
    info["student_heldout_ce"] = round(heldout_loss(small, held), 4)
    small.save_pretrained(student)
    tok.save_pretrained(student)
    # How much mass the top-k leaves: what a realistic distribution means for the tail.
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(held[: 16 * 128].reshape(16, 128)))
        p = model(x).logits.float().softmax(-1).flatten(0, 1)
        top = p.topk(64, dim=-1).values.cumsum(-1)
        info["mean_mass_outside_top_k"] = {k: round(float(1 - top[:, k - 1].mean()), 4) for k in (4, 8, 16, 64)}
    json.dump(info, open(info_path, "w"), indent=1)
    print(json.dumps({"bench": "bpe_storage", "stage": "models", **info}), flush=True)
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/bpe32k")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--max-mb", type=float, default=64.0, help="millions of characters of text")
    ap.add_argument("--teacher-hidden", type=int, default=128)
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--sequences", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--recompute", type=int, default=16)
    args = ap.parse_args()
    info = build(args)
    w = args.workdir
    grid = (1.0, 2.0, 4.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, k, n, enc) in enumerate(SETTINGS):
            out = os.path.join(tmp, f"c{i}")
            res = dump_mod.run(DumpConfig(teacher=os.path.join(w, "teacher"), data=os.path.join(w, "corpus.jsonl"),
                                          out=out, seq_len=args.seq_len, top_k=k, sampled_tail=n, encoding=enc,
                                          temperatures=grid, max_sequences=args.sequences, batch_size=16))
            fid = recompute(VerifyConfig(cache=out, recompute=args.recompute, teacher=os.path.join(w, "teacher"),
                                         student=os.path.join(w, "student")))
            mode = "sampled" if n else "bucket"
            by = {(r["mode"], r["T"]): r for r in fid["rows"]}
            bpt = {a: round(v, 2) for a, v in res["bytes_per_token"].items() if a.startswith("logits/")}
            row = {"bench": "bpe_storage", "setting": label, "vocab": info["vocab"], "top_k": k, "sampled_tail": n,
                   "encoding": enc, "mode": mode, "bytes_per_token": bpt,
                   "bytes_per_token_logits": round(sum(bpt.values()), 1),
                   **{f"{key}_T{t:g}": float(f"{by[mode, t][key]:.3g}") for t in grid for key in ("kl", "angle_deg")}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    arrays = sorted({a for r in rows for a in r["bytes_per_token"]})
    short = [a.removeprefix("logits/") for a in arrays]
    print(f"\nV = {info['vocab']:,}; teacher held-out CE {info['teacher_heldout_ce']} (unigram "
          f"{info['unigram_heldout_ce']}); mass outside the top-k {info['mean_mass_outside_top_k']}\n")
    print("| setting | loss | " + " | ".join(short) + " | B/token | angle T=1 | T=2 | T=4 |")
    print("|---|---|" + "---|" * len(arrays) + "---|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r['bytes_per_token'].get(a, 0):.1f}" if a in r["bytes_per_token"] else "—"
                           for a in arrays)
        print(f"| {r['setting']} | {r['mode']} | {cells} | {r['bytes_per_token_logits']:.1f} | "
              f"{r['angle_deg_T1']:.1f}° | {r['angle_deg_T2']:.1f}° | {r['angle_deg_T4']:.1f}° |")


if __name__ == "__main__":
    main()
