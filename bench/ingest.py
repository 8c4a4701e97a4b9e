"""Data preparation at scale: tokens/s with 1 and 2 processes, a dump rank's peak RSS before its first
forward at 10M and 100M tokens, and how soon a second run of the same command reaches that forward.

    python bench/ingest.py --workdir runs/demo          (after `make demo`: its corpus and teacher)

The corpus is the demo's training docstrings repeated until it holds about --tokens tokens (one JSON
line per docstring). For each size:
  prepare_np1 / prepare_np2  (--prepare-sizes) data.prepare with --num-proc 1 / 2 into a fresh datasets
                             cache, in a fresh process (TOKENIZERS_PARALLELISM=false, so the processes
                             are the only parallelism): tokens/s of prepared (packed) tokens, after the
                             JSON file was loaded into Arrow (load_json_s, one file: sequential);
  dump_first / dump_again    `pikv dump-teacher` killed just before its first forward (PIKV_FAULT=forward:1):
                             its peak RSS (wait4: the process and its map workers, heap and resident
                             file pages together), the sampled peaks of the dump process's heap
                             (RssAnon) and resident file pages (RssFile), and wall time, the first time (tokenize + pack, 2
                             processes) and again (the prepared data found in the datasets cache).
Prints one JSON line per measurement and a summary line with the issue's ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PREPARE = """
import json, sys, time
from pikv_offline.data import load_records, prepare
from pikv_offline.modeling import tokenizer_hash
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
t0 = time.perf_counter()
load_records(sys.argv[2])  # JSON -> Arrow, one file: sequential; prepare below finds it in the cache
t1 = time.perf_counter()
p = prepare(data=sys.argv[2], split="train", data_config=None, tokenizer=tok, tokenizer_sha256=tokenizer_hash(tok),
            text_field="text", chat_field=None, seq_len=int(sys.argv[3]), pack=True, num_proc=int(sys.argv[4]))
print(json.dumps({"load_s": t1 - t0, "seconds": time.perf_counter() - t1, "sequences": p.n}))
"""


def make_corpus(src: str, out: str, tokens: int, tokens_per_copy: int) -> None:
    lines = open(src).read().splitlines()
    with open(out, "w") as f:
        for _ in range(max(1, round(tokens / tokens_per_copy))):
            f.write("\n".join(lines) + "\n")


def _rss_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a process in KiB: its heap and stacks vs its resident file pages (the
    memory-mapped Arrow files, the shared libraries), which the kernel may drop and re-read."""
    try:
        fields = dict(ln.split(":", 1) for ln in open(f"/proc/{pid}/status") if ln.startswith(("RssAnon", "RssFile")))
        return int(fields["RssAnon"].split()[0]), int(fields["RssFile"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


class RssSampler(threading.Thread):
    """Peak RssAnon and RssFile of one process, sampled every 10 ms (Linux keeps no peak per kind)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.anon, self.file, self.done = pid, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            anon, file = _rss_kib(self.pid)
            self.anon, self.file = max(self.anon, anon), max(self.file, file)


def run_child(cmd: list[str], env: dict) -> tuple[int, float, dict, str]:
    """(return code, wall seconds, peak RSS MiB, stdout) of a child process: its peak RSS from wait4
    (heap and resident file pages together) and the sampled peaks of each kind."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = RssSampler(p.pid)
    sampler.start()
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    sampler.done.set()
    sampler.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    rss = {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "peak_anon_mib": round(sampler.anon / 1024, 1),
           "peak_file_mib": round(sampler.file / 1024, 1)}
    return p.returncode, time.perf_counter() - t0, rss, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--sizes", default="10e6,100e6", help="corpus sizes in tokens (dump_first / dump_again)")
    ap.add_argument("--prepare-sizes", default="10e6", help="the sizes also prepared with 1 and 2 processes")
    ap.add_argument("--seq-len", type=int, default=512)  # the demo teacher's context
    args = ap.parse_args()
    teacher, src = os.path.join(args.workdir, "teacher"), os.path.join(args.workdir, "corpus.jsonl")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    per_copy = sum(len(x) + 1 for x in tok([json.loads(ln)["text"] for ln in open(src)])["input_ids"])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (float(s) for s in args.sizes.split(",")):
            corpus = os.path.join(tmp, f"corpus-{size:.0e}.jsonl")
            make_corpus(src, corpus, int(size), per_copy)
            for np_ in ((1, 2) if size in [float(x) for x in args.prepare_sizes.split(",")] else ()):
                env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(tmp, f"hf-{size:.0e}-np{np_}"),
                       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
                code, wall, rss, out = run_child([sys.executable, "-c", PREPARE, teacher, corpus, str(args.seq_len),
                                                  str(np_)], env)
                got = json.loads(out.strip().splitlines()[-1])
                row = {"bench": "ingest", "what": f"prepare_np{np_}", "tokens_target": int(size),
                       "prepared_tokens": got["sequences"] * args.seq_len, "load_json_s": round(got["load_s"], 2),
                       "seconds": round(got["seconds"], 2),
                       "tokens_per_s": round(got["sequences"] * args.seq_len / got["seconds"], 1), **rss}
                rows[(size, row["what"])] = row
                print(json.dumps(row), flush=True)
            env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(tmp, f"hf-{size:.0e}-dump"),
                   "PIKV_FAULT": "forward:1", "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "pikv_offline", "dump-teacher", "--teacher", teacher, "--data", corpus,
                   "--out", os.path.join(tmp, f"cache-{size:.0e}"), "--seq-len", str(args.seq_len), "--num-proc", "2"]
            for what in ("dump_first", "dump_again"):
                code, wall, rss, _ = run_child(cmd, env)
                row = {"bench": "ingest", "what": what, "tokens_target": int(size), "killed_at_first_forward": code == -9,
                       "seconds_to_first_forward": round(wall, 2), **rss}
                rows[(size, what)] = row
                print(json.dumps(row), flush=True)
    sizes = sorted({s for s, _ in rows})
    small, big = sizes[0], sizes[-1]
    print(json.dumps({
        "bench": "ingest-summary",
        "rss_big_over_small_dump_rank": round(rows[(big, "dump_first")]["peak_rss_mib"]
                                              / rows[(small, "dump_first")]["peak_rss_mib"], 3),
        "anon_big_over_small_dump_rank": round(rows[(big, "dump_first")]["peak_anon_mib"]
                                               / rows[(small, "dump_first")]["peak_anon_mib"], 3),
        "np2_over_np1": {f"{s:.0e}": round(rows[(s, "prepare_np2")]["tokens_per_s"]
                                           / rows[(s, "prepare_np1")]["tokens_per_s"], 3)
                         for s in sizes if (s, "prepare_np1") in rows},
        "second_run_seconds_to_first_forward": {f"{s:.0e}": rows[(s, "dump_again")]["seconds_to_first_forward"]
                                                for s in sizes},
    }))


if __name__ == "__main__":
    main()
