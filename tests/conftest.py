"""Shared fixtures: a corpus, a tokenizer trained here, tiny GPT-2 and Llama shaped teachers. No downloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The prepared data of the tests goes to a cache of their own, shared by the subprocesses they start.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="pikv-test-datasets-"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512
CONTEXT = 128


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pikv")


@pytest.fixture(scope="session")
def texts():
    from pikv_offline.tools.corpus import docstrings

    return docstrings()[:400]


@pytest.fixture(scope="session")
def corpus(workdir, texts):
    return write_jsonl(workdir / "corpus.jsonl", [{"text": t} for t in texts])


@pytest.fixture(scope="session")
def tokenizer(texts):
    from pikv_offline.tools.toy import train_tokenizer

    return train_tokenizer(texts, vocab_size=VOCAB)


def _teacher(workdir, tokenizer, kind):
    from pikv_offline.tools.toy import make_model

    path = workdir / f"teacher-{kind}"
    if not path.exists():
        make_model(kind, len(tokenizer), hidden=48, layers=2, heads=4, context=CONTEXT, seed=1).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def gpt2_teacher(workdir, tokenizer):
    return _teacher(workdir, tokenizer, "gpt2")


@pytest.fixture(scope="session")
def llama_teacher(workdir, tokenizer):
    return _teacher(workdir, tokenizer, "llama")


def pikv_subprocess(args, *, nproc=1, env=None, timeout=300):
    """Run `python -m pikv_offline ARGS` (under torchrun when nproc > 1); returns CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--standalone", "-m", "pikv_offline", *args]
    else:
        cmd = [sys.executable, "-m", "pikv_offline", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session")
def train_cache(workdir, llama_teacher, corpus):
    """A small cache for stage-two tests: 64 sequences of 64 tokens, k=16, T grid 1,2."""
    from pikv_offline.config import DumpConfig
    from pikv_offline.teacher.dump import run

    out = workdir / "train-cache"
    run(DumpConfig(sampled_tail=0, encoding="fp16", teacher=llama_teacher, data=corpus, out=str(out), seq_len=64, top_k=16,
                   temperatures=(1.0, 2.0), shard_seqs=8, batch_size=8, max_sequences=64))
    return str(out)


@pytest.fixture(scope="session")
def student_config(workdir, tokenizer):
    path = workdir / "student.json"
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32,
                                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "intermediate_size": 64, "max_position_embeddings": CONTEXT,
                                "tie_word_embeddings": True}))
    return str(path)


@pytest.fixture(scope="session")
def trained_cache(workdir, tokenizer, texts):
    """A teacher trained briefly on the corpus (so it knows something), dumped at k=16, T grid 1,2."""
    import numpy as np

    from pikv_offline.config import DumpConfig
    from pikv_offline.tools.toy import train_lm
    from pikv_offline.teacher.dump import run
    from pikv_offline.tools.toy import make_model

    path = workdir / "trained-teacher"
    stream = np.concatenate([np.asarray(t + [tokenizer.eos_token_id]) for t in tokenizer(texts)["input_ids"]])
    model = make_model("llama", len(tokenizer), hidden=64, layers=2, heads=4, context=CONTEXT, seed=2)
    train_lm(model, stream, 80, batch=16, seq=64, lr=5e-3, log_every=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_jsonl(workdir / "corpus-train.jsonl", [{"text": t} for t in texts])
    out = workdir / "trained-cache"
    run(DumpConfig(sampled_tail=0, encoding="fp16", teacher=str(path), data=str(workdir / "corpus-train.jsonl"), out=str(out), seq_len=64,
                   top_k=16, temperatures=(1.0, 2.0), shard_seqs=8, batch_size=8, max_sequences=96))
    return str(out)
