"""Teachers and students at our users' vocabularies, from config (random weights: for speed and memory,
not quality), with data and a cache to train from.

    python bench/shapes.py --out runs/shapes --shape qwen [--seq-len 2048 --sequences 12 --dump]

writes OUT/SHAPE/teacher (a small-hidden model with the shape's true vocabulary, and a 4,096-token
BPE tokenizer trained here on the standard library's docstrings: every id it emits is inside the
vocabulary), OUT/SHAPE/corpus.jsonl, OUT/SHAPE/student.json (hidden 256) and, with --dump, a compact
cache OUT/SHAPE/cache (top-8 + 16 sampled, bf16) for bench/train_throughput.py. Then e.g.

    python bench/train_throughput.py --cache runs/shapes/qwen/cache --student-config runs/shapes/qwen/student.json \
        --batch-size 1 --steps 4 --warmup 1
    python bench/dump_throughput.py --teacher runs/shapes/qwen/teacher --data runs/shapes/qwen/corpus.jsonl \
        --seq-len 2048 --batch-size 1 --max-sequences 8

With --real the teacher has its family's public shape instead (Qwen2.5-0.5B: hidden 896, 24 layers;
Llama-3.2-1B: hidden 2048, 16 layers; tied embeddings), random weights, saved in float32:

    python bench/shapes.py --out runs/shapes-real --shape llama3 --real
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The vocabularies and families of the teachers users distill (config.json of each public model).
SHAPES = {
    "qwen": {"model_type": "qwen2", "vocab_size": 151936},  # Qwen2 / Qwen2.5
    "llama3": {"model_type": "llama", "vocab_size": 128256},  # Llama 3.x
}


# With --real: the public model of that family whose shape a user would dump (its config.json's numbers).
REAL = {
    "qwen": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "tie_word_embeddings": True},  # Qwen2.5-0.5B
    "llama3": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "tie_word_embeddings": True, "rope_theta": 500000.0},  # Llama-3.2-1B
}


def model_config(shape: str, hidden: int, layers: int, context: int) -> dict:
    return {**SHAPES[shape], "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": hidden * 3, "max_position_embeddings": context,
            "tie_word_embeddings": False}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/shapes")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen")
    ap.add_argument("--teacher-hidden", type=int, default=64)
    ap.add_argument("--student-hidden", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--sequences", type=int, default=12)
    ap.add_argument("--dump", action="store_true")
    ap.add_argument("--real", action="store_true", help="the teacher at its public model's full shape (REAL), "
                    "not --teacher-hidden with 2 layers; use its own --out")
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pikv_offline.tools.corpus import write_corpus
    from pikv_offline.tools.toy import train_tokenizer

    base = os.path.join(args.out, args.shape)
    teacher, corpus = os.path.join(base, "teacher"), os.path.join(base, "corpus.jsonl")
    if not os.path.isfile(os.path.join(teacher, "config.json")):
        write_corpus(corpus)
        tok = train_tokenizer([json.loads(line)["text"] for line in open(corpus)], vocab_size=4096)
        torch.manual_seed(0)
        shape = model_config(args.shape, args.teacher_hidden, 2, args.seq_len)
        cfg = AutoConfig.for_model(**{**shape, **(REAL[args.shape] if args.real else {})},
                                   bos_token_id=0, eos_token_id=0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(teacher)
        tok.save_pretrained(teacher)
    student = os.path.join(base, "student.json")
    json.dump(model_config(args.shape, args.student_hidden, 2, args.seq_len), open(student, "w"))
    out = {"teacher": teacher, "data": corpus, "student_config": student}
    if args.dump:
        from pikv_offline.config import DumpConfig
        from pikv_offline.teacher.dump import run

        cache = os.path.join(base, "cache")
        run(DumpConfig(teacher=teacher, data=corpus, out=cache, seq_len=args.seq_len, top_k=8, sampled_tail=16,
                       encoding="bf16", max_sequences=args.sequences, batch_size=1, shard_seqs=4))
        out["cache"] = cache
    print(json.dumps(out))


if __name__ == "__main__":
    main()
