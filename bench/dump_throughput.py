"""Stage one: dump throughput versus the same teacher's forward-only throughput, and bytes/token.

    python bench/dump_throughput.py --teacher runs/demo/teacher --data runs/demo/corpus.jsonl

Forward-only = the plain HF forward producing logits, on exactly the sequences and batch size
the dump uses. Dump = `pikv dump-teacher` in process (top-k, normalizer at every grid temperature,
encoding, compression, writing), timed over its loop, i.e. without model loading. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pikv_offline.config import DumpConfig  # noqa: E402
from pikv_offline.data import prepare  # noqa: E402
from pikv_offline.modeling import resolve_dtype, tokenizer_hash  # noqa: E402
from pikv_offline.teacher import dump as dump_mod  # noqa: E402
from pikv_offline.teacher import model as M  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--temperatures", default="1,2,4")
    ap.add_argument("--max-sequences", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--sampled-tail", type=int, default=0)
    ap.add_argument("--encoding", default="fp16")
    ap.add_argument("--tail-temperatures", default=None, help="where the tail draws (default: the grid)")
    args = ap.parse_args()
    temps = tuple(float(t) for t in args.temperatures.split(","))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = resolve_dtype(args.dtype, device)

    tok = M.load_tokenizer(args.teacher, args.teacher)
    prep = prepare(data=args.data, split="train", data_config=None, tokenizer=tok, tokenizer_sha256=tokenizer_hash(tok),
                   text_field="text", chat_field=None, seq_len=args.seq_len, pack=True, max_sequences=args.max_sequences)
    input_ids, _ = prep.rows(0, prep.n)
    model = M.load_model(args.teacher, args.teacher, dtype, device, None)
    vocab = model.get_output_embeddings().weight.shape[0]  # the teacher's, not its tokenizer's
    x_all = torch.from_numpy(input_ids).long()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        model(x_all[: args.batch_size].to(device))  # warm-up
        sync()
        t0 = time.perf_counter()
        for b in range(0, len(x_all), args.batch_size):
            model(x_all[b:b + args.batch_size].to(device)).logits.float()
        sync()
        forward_s = time.perf_counter() - t0
    del model
    tokens = x_all.numel()

    with tempfile.TemporaryDirectory() as out:
        res = dump_mod.run(DumpConfig(teacher=args.teacher, data=args.data, out=os.path.join(out, "c"),
                                      seq_len=args.seq_len, top_k=args.top_k, temperatures=temps,
                                      batch_size=args.batch_size, max_sequences=args.max_sequences,
                                      device=args.device, dtype=args.dtype, sampled_tail=args.sampled_tail,
                                      encoding=args.encoding, tail_temperatures=None if args.tail_temperatures is None
                                      else tuple(float(t) for t in args.tail_temperatures.split(","))))
    fwd = tokens / forward_s
    print(json.dumps({
        "bench": "dump_throughput", "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "sequences": len(x_all), "seq_len": args.seq_len,
        "batch_size": args.batch_size, "top_k": args.top_k, "temperatures": list(temps),
        "vocab_size": vocab, "forward_only_tokens_per_s": round(fwd, 1),
        "dump_tokens_per_s": res["dump_tokens_per_s"],
        "dump_over_forward": round(res["dump_tokens_per_s"] / fwd, 3),
        # forward + top-k + LSE + host copy, excluding encode/compress/write: what overlap must hide
        "dump_compute_tokens_per_s": res["compute_tokens_per_s"],
        "bytes_per_token": res["bytes_per_token"],
        "bytes_per_token_logit_targets": round(sum(v for k, v in res["bytes_per_token"].items()
                                                   if k.startswith("logits/")), 2),
        "bytes_per_token_total": round(sum(res["bytes_per_token"].values()), 2),
        "sampled_tail": args.sampled_tail, "tail_temperatures": args.tail_temperatures or args.temperatures,
        "encoding": args.encoding,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # both runs, this process
    }))


if __name__ == "__main__":
    main()
