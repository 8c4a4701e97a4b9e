"""Stage two: accumulation, ranks, resume and chunking are equivalences; checkpoints load and generate."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, pikv_subprocess
from pikv_offline.config import TrainConfig
from pikv_offline.student import data as D
from pikv_offline.student.train import run


def train(cache, student_config, out, **kw):
    kw.setdefault("max_steps", 4)
    kw.setdefault("batch_size", 4)
    kw.setdefault("lr", 3e-3)
    kw.setdefault("eval_fraction", 0.1)
    kw.setdefault("num_workers", 0)
    kw.setdefault("log_every", 1)
    kw.setdefault("warmup_steps", 1)
    return run(TrainConfig(cache=cache, student_config=student_config, out=str(out), **kw))


def weights(run_dir):
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def assert_weights_close(a, b, exact=False, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_order_is_a_permutation_and_splits_disjointly(train_cache):
    from pikv_offline.cache.reader import open_cache

    index = D.CacheIndex(open_cache(train_cache), 0.1)
    o0, o1 = index.epoch_order(0, 0), index.epoch_order(0, 1)
    assert sorted(o0) == sorted(index.train) and len(index.eval) > 0
    assert not set(index.eval // index.chunk) & set(index.train // index.chunk), "held out by whole chunks"
    assert not (o0 == o1).all(), "each epoch reshuffles"
    seen = []
    for rank in range(2):
        plan = D.plan_targets(open_cache(train_cache), None, 1.0, "auto")
        stream = D.TrainStream(train_cache, index, plan, seed=0, epoch=0, start=0, batch_size=3, rank=rank,
                               world_size=2)
        seen.append([int(s) for b in stream for s in b.sample_id])
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == D.micro_steps_per_epoch(len(o0), 3, 2) * 3


def test_tensorstore_reads_the_same_batches_as_zarr(train_cache, workdir):
    """--reader tensorstore (the default when installed) == --reader zarr, batch by batch, bitwise; and a
    damaged chunk read through TensorStore is the same one line naming the array. TensorStore runs in the
    DataLoader worker only (it is not fork-safe: this test process must not use it)."""
    pytest.importorskip("tensorstore")
    import shutil

    from pikv_offline.cache.reader import open_cache

    cache = open_cache(train_cache)
    index = D.CacheIndex(cache, 0.1)
    plan = D.plan_targets(cache, None, 1.0, "auto")
    got = {}
    for reader in ("zarr", "tensorstore"):
        source = D.train_batches(train_cache, index, plan, seed=0, batch_size=3, rank=0, world_size=1, num_workers=1,
                                 pin_memory=False, reader=reader)
        got[reader] = list(source(0, 0))
    assert len(got["zarr"]) == len(got["tensorstore"]) > 3
    for a, b in zip(got["zarr"], got["tensorstore"]):
        for field in ("input_ids", "loss_mask", "sample_id", "head_ids", "head_logprobs", "tnorm", "tail_ids",
                      "tail_logprobs", "tail_counts"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    bad = workdir / "tensorstore-damaged"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(train_cache, bad)
    for f in (p for p in (bad / "logits" / "logprobs" / "c").rglob("*") if p.is_file()):  # every unit: one is read
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    source = D.train_batches(str(bad), D.CacheIndex(open_cache(str(bad)), 0.1), plan, seed=0, batch_size=3, rank=0,
                             world_size=1, num_workers=1, pin_memory=False, reader="tensorstore")
    errors = [b for b in source(0, 0) if isinstance(b, D.StreamError)]
    assert errors and "logits/logprobs: the stored data of sequences" in errors[0].message, errors


def test_grad_accumulation_2_equals_1(train_cache, student_config, tmp_path):
    train(train_cache, student_config, tmp_path / "a", batch_size=8, grad_accum=1, ce_weight=0.3)
    train(train_cache, student_config, tmp_path / "b", batch_size=4, grad_accum=2, ce_weight=0.3)
    assert_weights_close(weights(tmp_path / "a"), weights(tmp_path / "b"))
    la, lb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert abs(la[0]["loss"] - lb[0]["loss"]) < 1e-5


def test_two_ranks_equal_one_rank(train_cache, student_config, tmp_path):
    train(train_cache, student_config, tmp_path / "one", batch_size=8)
    p = pikv_subprocess(["train-student", "--cache", train_cache, "--student-config", student_config,
                         "--out", str(tmp_path / "two"), "--max-steps", "4", "--batch-size", "4", "--lr", "3e-3",
                         "--eval-fraction", "0.1", "--num-workers", "0", "--warmup-steps", "1", "--zero"], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_weights_close(weights(tmp_path / "one"), weights(tmp_path / "two"))


def test_resume_equals_uninterrupted(train_cache, student_config, tmp_path):
    train(train_cache, student_config, tmp_path / "full", max_steps=6, ce_weight=0.2)
    part = tmp_path / "part"
    train(train_cache, student_config, part, max_steps=6, ce_weight=0.2, save_every=3)
    for name in ("final", "checkpoint-6"):  # as if it had been killed after checkpoint-3
        shutil.rmtree(part / name)
    res = train(train_cache, student_config, part, max_steps=6, ce_weight=0.2, save_every=3, resume=True)
    assert res["steps"] == 6
    assert_weights_close(weights(tmp_path / "full"), weights(part), exact=True)


def test_epochs_cross_a_boundary_with_the_default_worker_and_resume_exactly(train_cache, student_config, tmp_path):
    """--epochs 1.5 runs ceil(1.5 x steps per epoch) steps and reshuffles at the epoch boundary; the default
    reader (one DataLoader worker process) gives bitwise the in-process reader's weights; a run resumed from a
    checkpoint inside the second epoch ends bitwise where the uninterrupted one does."""
    import math

    from pikv_offline.cache.reader import open_cache

    per_epoch = D.micro_steps_per_epoch(len(D.CacheIndex(open_cache(train_cache), 0.1).train), 4, 1)
    kw = dict(max_steps=None, epochs=1.5, ce_weight=0.2)
    res = train(train_cache, student_config, tmp_path / "inline", **kw)
    assert res["steps"] == math.ceil(1.5 * per_epoch) > per_epoch
    assert {r["epoch"] for r in metrics(tmp_path / "inline") if "loss" in r} == {0, 1}
    train(train_cache, student_config, tmp_path / "worker", num_workers=1, **kw)
    assert_weights_close(weights(tmp_path / "inline"), weights(tmp_path / "worker"), exact=True)
    part = tmp_path / "part"
    save = per_epoch + 2
    train(train_cache, student_config, part, num_workers=1, save_every=save, **kw)
    for name in ("final", f"checkpoint-{res['steps']}"):  # as if killed after the checkpoint in epoch 1
        shutil.rmtree(part / name)
    again = train(train_cache, student_config, part, num_workers=1, save_every=save, resume=True, **kw)
    assert again["steps"] == res["steps"]
    assert_weights_close(weights(tmp_path / "inline"), weights(part), exact=True)


def test_checkpoint_reloads_and_generates(train_cache, student_config, tmp_path):
    train(train_cache, student_config, tmp_path / "r", max_steps=2)
    final = tmp_path / "r" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    x = tok("The function returns", return_tensors="pt")
    out = model.generate(**x, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == x["input_ids"].shape[1] + 5
    assert not any(f.endswith(".pt") for f in os.listdir(final)), "final/ is the student alone"
    assert os.path.isfile(tmp_path / "r" / "checkpoint-2" / "trainer_state.pt")


def test_kd_loss_falls_and_metrics_are_logged(trained_cache, student_config, tmp_path):
    res = train(trained_cache, student_config, tmp_path / "e2e", max_steps=30, lr=1e-2, warmup_steps=2,
                temperature=2.0, eval_every=10, batch_size=8)
    m = metrics(tmp_path / "e2e")
    steps = [r for r in m if "loss" in r]
    evals = [r for r in m if "eval_ce" in r]
    for key in ("step", "loss", "kd", "ce", "lr", "grad_norm", "tokens_per_s", "skipped"):
        assert key in steps[-1]
    assert sum(r["kd"] for r in steps[-5:]) / 5 < 0.7 * sum(r["kd"] for r in steps[:5]) / 5
    assert len(evals) == 3 and evals[-1]["eval_kd"] < evals[0]["eval_kd"]
    assert {"eval_ce", "eval_ppl", "eval_kd", "eval_top1"} <= evals[-1].keys()
    assert res["skipped"] == 0


def test_eval_command_matches_training_eval(train_cache, student_config, tmp_path):
    res = train(train_cache, student_config, tmp_path / "ev", max_steps=3)
    p = pikv_subprocess(["eval", "--cache", train_cache, "--student", str(tmp_path / "ev" / "final"),
                         "--eval-fraction", "0.1", "--json"])
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["eval_tokens"] == res["eval"]["eval_tokens"]
    assert abs(got["eval_ce"] - res["eval"]["eval_ce"]) < 1e-4


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    from pikv_offline.student.train import lr_factor

    cfg = TrainConfig(cache="c", out="o", student="s", max_steps=100, warmup_steps=10, schedule=schedule,
                      min_lr_ratio=0.1, decay_fraction=0.2)
    f = [lr_factor(s, cfg, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    if schedule == "constant":
        assert all(x == 1.0 for x in f[10:])
    elif schedule == "wsd":
        assert all(x == 1.0 for x in f[10:82]) and f[99] == pytest.approx(0.1, abs=0.02)
    else:
        assert f[99] == pytest.approx(0.1, abs=0.01) and f[50] < f[30]


def test_bucket_kd_from_a_full_vocab_cache_equals_kl_div(llama_teacher, corpus, workdir):
    """End to end through the cache: dump at k = vocab, read as training does, compare with F.kl_div."""
    import torch.nn.functional as F

    from conftest import VOCAB
    from pikv_offline.cache.reader import open_cache
    from pikv_offline.config import DumpConfig
    from pikv_offline.student.losses import kd_loss
    from pikv_offline.teacher.dump import run as dump

    out = workdir / "fullk-train"
    dump(DumpConfig(sampled_tail=0, encoding="fp16", teacher=llama_teacher, data=corpus, out=str(out), seq_len=32, top_k=VOCAB,
                    temperatures=(1.0, 2.0), shard_seqs=4, max_sequences=3))
    cache = open_cache(str(out))
    for T, j in ((1.0, 0), (2.0, 1)):
        plan = D.plan_targets(cache, VOCAB, T, "bucket")
        assert plan.grid_index == j
        b = D.to_batch(D.read_rows(cache, D.CacheIndex(cache, 0.0).train), cache.encoding, plan)
        n = b.head_ids.shape[0] * b.head_ids.shape[1]
        s_logits = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(0)) * 2
        s_lsm = torch.log_softmax(s_logits / T, -1)
        args = [t.reshape(n, *t.shape[2:]) for t in (b.head_ids, b.head_logprobs, b.tnorm)]
        got, _ = kd_loss(s_lsm, *args, temperature=T)
        ids, lp, tnorm = args
        p = torch.zeros(n, VOCAB).scatter(-1, ids, (lp / T - tnorm[:, None]).exp())
        torch.testing.assert_close(got, F.kl_div(s_lsm, p, reduction="sum") * T * T, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("T", [2.0])  # T = 2 carries the normalizer; T = 1 is its special case
def test_online_kd_equals_training_from_a_full_vocab_cache(T, llama_teacher, corpus, workdir, student_config, tmp_path):
    """tools/online.py (the demo's and bench/quality.py's online KD, teacher resident) trains exactly as a
    cache of k = V does: the same batches, the same targets up to the cache's fp16 rounding."""
    from conftest import VOCAB
    from pikv_offline.config import DumpConfig
    from pikv_offline.teacher.dump import run as dump
    from pikv_offline.tools.online import online_source

    out = workdir / "fullk-online"
    dump(DumpConfig(sampled_tail=0, encoding="fp16", teacher=llama_teacher, data=corpus, out=str(out), seq_len=32, top_k=VOCAB,
                    temperatures=(1.0, 2.0), shard_seqs=4, max_sequences=16))
    kw = dict(max_steps=3, temperature=T, tail="bucket", ce_weight=0.5, batch_size=2)
    train(str(out), student_config, tmp_path / "cached", **kw)
    cfg = TrainConfig(cache=str(out), student_config=student_config, out=str(tmp_path / "online"), max_steps=3,
                      batch_size=2, lr=3e-3, eval_fraction=0.1, num_workers=0, log_every=1, warmup_steps=1,
                      temperature=T, tail="bucket", ce_weight=0.5)
    run(cfg, online_source(cfg, llama_teacher))
    cached, online = metrics(tmp_path / "cached"), metrics(tmp_path / "online")
    steps = [(a, b) for a, b in zip(cached, online) if "kd" in a]
    assert len(steps) == 3
    for a, b in steps:
        assert a["step"] == b["step"] and a["ce"] == pytest.approx(b["ce"], rel=1e-4)
        assert a["kd"] == pytest.approx(b["kd"], rel=2e-2, abs=1e-4) and a["kd"] > 0


def test_non_finite_loss_is_reported_and_skipped(train_cache, student_config, tmp_path, monkeypatch, capsys):
    from pikv_offline.student import distiller as T

    calls = {"n": 0}
    real = T.kd_rows_at  # what the Distiller's (fused) KD loss is made of

    def flaky(*a, **k):
        calls["n"] += 1
        rows = real(*a, **k)
        return rows * float("nan") if calls["n"] == 2 else rows

    monkeypatch.setattr(T, "kd_rows_at", flaky)
    res = train(train_cache, student_config, tmp_path / "nan", max_steps=3)
    assert res["skipped"] == 1
    assert "step 1: non-finite loss" in capsys.readouterr().out
    assert [r["skipped"] for r in metrics(tmp_path / "nan") if "loss" in r] == [0, 1, 1]
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "nan").values())


@pytest.mark.parametrize("top_k", [4, 0])
def test_sampled_tail_cache_trains(top_k, trained_cache, student_config, workdir, tmp_path):
    """--tail auto picks the sampled estimator on a cache that holds one; KD goes down; 2 ranks == 1."""
    from pikv_offline.config import DumpConfig
    from pikv_offline.teacher.dump import run as dump

    cache = workdir / f"sampled-train-{top_k}"
    if not cache.exists():  # the trained teacher of the trained_cache fixture, so there is something to learn
        dump(DumpConfig(teacher=str(workdir / "trained-teacher"), data=str(workdir / "corpus-train.jsonl"),
                        out=str(cache), seq_len=64, top_k=top_k, sampled_tail=8, encoding="bf16",
                        temperatures=(1.0, 2.0), shard_seqs=8, max_sequences=64))
    res = train(str(cache), student_config, tmp_path / "s", max_steps=12, ce_weight=0.0)
    cfg = json.load(open(tmp_path / "s" / "config.json"))
    assert cfg["tail_mode"] == "sampled"
    kd = [r["kd"] for r in metrics(tmp_path / "s") if "kd" in r]
    assert sum(kd[-3:]) < 0.8 * sum(kd[:3]), kd
    assert res["eval"]["eval_kd"] > 0
    if top_k:
        return
    p = pikv_subprocess(["train-student", "--cache", str(cache), "--student-config", student_config,
                         "--out", str(tmp_path / "two"), "--max-steps", "12", "--batch-size", "2", "--lr", "3e-3",
                         "--eval-fraction", "0.1", "--num-workers", "0", "--warmup-steps", "1",
                         "--ce-weight", "0"], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    train(str(cache), student_config, tmp_path / "one", max_steps=12, ce_weight=0.0,
          batch_size=4)
    # Adam's step is about lr x sign(g) for a gradient near 0, so the last bit that the order of a 2-rank sum
    # changes can move such an entry by a fraction of lr (3e-3) per step; 12 steps of the high-variance k = 0
    # estimator moved one embedding entry of 16,384 by 1.2e-5 on one machine (all others <= 7e-7)
    assert_weights_close(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=5e-5)


def test_crafted_trainer_state_runs_no_code(train_cache, student_config, tmp_path):
    """--resume loads trainer_state.pt with weights_only=True: a pickle that would create a file on load
    is refused with one clear error and creates nothing."""
    import pickle

    from pikv_offline.errors import PikvError

    out = tmp_path / "r"
    train(train_cache, student_config, out, max_steps=2)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(out / "checkpoint-2" / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": Evil()}, f)
    with pytest.raises(PikvError, match="not a trainer state this pikv can load safely"):
        train(train_cache, student_config, out, max_steps=4, resume=True)
    assert not marker.exists()


def test_only_tokenizer_files_are_copied_from_the_cache(train_cache, student_config, tmp_path):
    """A model.safetensors (or config.json) planted in the cache's tokenizer/ never replaces the student's."""
    cache = tmp_path / "cache"
    shutil.copytree(train_cache, cache)
    (cache / "tokenizer" / "model.safetensors").write_bytes(b"not weights")
    (cache / "tokenizer" / "config.json").write_text("{}")
    train(str(cache), student_config, tmp_path / "r", max_steps=1)
    for folder in ("final", "checkpoint-1"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "r" / folder)  # its own weights and config
        assert AutoTokenizer.from_pretrained(tmp_path / "r" / folder).get_vocab()


def test_second_run_on_the_same_out_is_refused(train_cache, student_config, tmp_path):
    """The run folder is locked for a run's life (released by the kernel when the process dies)."""
    from pikv_offline.student import checkpoint

    out = tmp_path / "r"
    with checkpoint.out_lock(str(out)):  # another run holds it
        p = pikv_subprocess(["train-student", "--cache", train_cache, "--student-config", student_config, "--out",
                             str(out), "--max-steps", "1", "--num-workers", "0", "--batch-size", "4"])
    assert p.returncode == 2 and "is in use by another training run (pid " in p.stderr, p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.strip()]) == 1 and not (out / "final").exists()
    train(train_cache, student_config, out, max_steps=1)  # free again
    assert (out / "final").is_dir()


def test_a_diverged_run_stops_without_a_final(train_cache, student_config, tmp_path, monkeypatch):
    from pikv_offline.errors import PikvError
    from pikv_offline.student import distiller as T

    real = T.kd_rows_at
    monkeypatch.setattr(T, "kd_rows_at", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(PikvError, match="10 steps in a row .* non-finite loss or gradient"):
        train(train_cache, student_config, tmp_path / "r", max_steps=20, save_every=0)
    assert not (tmp_path / "r" / "final").exists()
    with pytest.raises(PikvError, match="3 steps in a row"):  # a run shorter than 10 steps: every one of them
        train(train_cache, student_config, tmp_path / "s", max_steps=3)
    assert not (tmp_path / "s" / "final").exists()


def test_a_finished_run_extended_by_resume_equals_one_long_run(train_cache, student_config, tmp_path, capsys):
    """--max-steps 10, then --max-steps 20 --resume: bitwise one 20-step run (constant LR); a decaying schedule
    whose length changed is named on one line."""
    kw = dict(schedule="constant", warmup_steps=0, ce_weight=0.3)
    train(train_cache, student_config, tmp_path / "long", max_steps=20, **kw)
    train(train_cache, student_config, tmp_path / "ext", max_steps=10, **kw)
    res = train(train_cache, student_config, tmp_path / "ext", max_steps=20, resume=True, **kw)
    assert res["steps"] == 20
    assert_weights_close(weights(tmp_path / "long"), weights(tmp_path / "ext"), exact=True)
    capsys.readouterr()
    train(train_cache, student_config, tmp_path / "cos", max_steps=4)
    train(train_cache, student_config, tmp_path / "cos", max_steps=6, resume="auto")
    assert "note: this run has 6 steps, the checkpoint's had 4: the cosine schedule" in capsys.readouterr().out


def test_a_restart_never_trains_silently_over_an_earlier_run(train_cache, student_config, tmp_path):
    from pikv_offline.errors import PikvError

    train(train_cache, student_config, tmp_path / "r", max_steps=2)
    with pytest.raises(PikvError, match="holds checkpoints of an earlier run \\(latest checkpoint-2\\); pass --resume"):
        train(train_cache, student_config, tmp_path / "r", max_steps=4)
    res = train(train_cache, student_config, tmp_path / "fresh", max_steps=2, resume="auto")  # nothing to resume
    assert res["steps"] == 2


def test_torchrun_restarts_finish_a_killed_run(train_cache, student_config, tmp_path):
    """torchrun --max-restarts 2 with --resume auto: rank 1 is killed after step 3 (first attempt only), the
    restarted ranks resume from checkpoint-2 and the run ends with the uninterrupted run's weights."""
    args = ["train-student", "--cache", train_cache, "--student-config", student_config, "--max-steps", "6",
            "--batch-size", "2", "--lr", "3e-3", "--eval-fraction", "0.1", "--num-workers", "0", "--save-every", "2",
            "--log-every", "1", "--resume", "auto"]
    p = pikv_subprocess([*args, "--out", str(tmp_path / "whole")], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
           "2", "-m", "pikv_offline", *args, "--out", str(tmp_path / "killed")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PIKV_FAULT": "step:3@1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stdout and (tmp_path / "killed" / "final").is_dir()
    assert_weights_close(weights(tmp_path / "whole"), weights(tmp_path / "killed"), exact=True)
    steps = [r["step"] for r in metrics(tmp_path / "killed") if "loss" in r]
    assert steps[:2] == [1, 2] and steps[-4:] == [3, 4, 5, 6], steps  # the restart redid steps 3.. from checkpoint-2


def test_two_runs_train_at_once_from_a_read_only_cache(train_cache, student_config, tmp_path):
    """Training never writes to the cache: two runs at once from a read-only bind mount of it (root can make
    one; skipped where it cannot), and the cache's files are unchanged."""
    ro = tmp_path / "ro-cache"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", train_cache, str(ro)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        before = sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in ro.rglob("*"))
        args = ["train-student", "--cache", str(ro), "--student-config", student_config, "--max-steps", "2",
                "--batch-size", "4", "--eval-fraction", "0.1"]
        procs = [subprocess.Popen([sys.executable, "-m", "pikv_offline", *args, "--out", str(tmp_path / f"run{i}")],
                                  cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
        assert sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in ro.rglob("*")) == before
        assert_weights_close(weights(tmp_path / "run0"), weights(tmp_path / "run1"), exact=True)
    finally:
        subprocess.run(["umount", str(ro)])


def test_temperature_schedule_steps_through_the_grid_and_equals_fixed_T_runs(train_cache, student_config, tmp_path):
    """--temperature-schedule 2:1 with the exact (bucket) tail takes the grid point nearest to the linear
    schedule at each step (2, 2, 1, 1 over 4 steps) and its steps at T=2 are bitwise a fixed --temperature 2
    run's; with --tail renorm it takes every value, counted in optimizer steps across an epoch boundary,
    and its first step is a fixed renorm run's at T0. A bad schedule is one clear line."""
    from pikv_offline.cache.reader import open_cache
    from pikv_offline.errors import PikvError

    sched = train(train_cache, student_config, tmp_path / "s", temperature_schedule="2:1")
    fixed = train(train_cache, student_config, tmp_path / "f", temperature=2.0)
    ms, mf = metrics(tmp_path / "s"), metrics(tmp_path / "f")
    assert [r["temperature"] for r in ms if "kd" in r] == [2.0, 2.0, 1.0, 1.0]
    assert [r["kd"] for r in ms if "kd" in r][:2] == [r["kd"] for r in mf if "kd" in r][:2]
    assert sched["last"]["kd"] != fixed["last"]["kd"]
    assert json.load(open(tmp_path / "s" / "config.json"))["temperature_schedule"] == [2.0, 1.0, "linear"]

    per_epoch = D.micro_steps_per_epoch(len(D.CacheIndex(open_cache(train_cache), 0.1).train), 4, 1)
    n = per_epoch + 3
    train(train_cache, student_config, tmp_path / "r", tail="renorm", temperature_schedule="3:1.5:cosine",
          max_steps=n)
    got = [r["temperature"] for r in metrics(tmp_path / "r") if "kd" in r]
    want = [3 - 1.5 * 0.5 * (1 - math.cos(math.pi * s / (n - 1))) for s in range(n)]
    assert got == pytest.approx(want, rel=1e-12)
    train(train_cache, student_config, tmp_path / "r3", tail="renorm", temperature=3.0, max_steps=1)
    assert metrics(tmp_path / "r")[0]["kd"] == metrics(tmp_path / "r3")[0]["kd"]

    for kw, words in ((dict(temperature_schedule="1:4"), "4 is not in the cache's grid"),
                      (dict(temperature_schedule="2:1", temperature=2.0), "give one"),
                      (dict(temperature_schedule="2-1"), "give T0:T1"),
                      (dict(temperature_schedule="2:1:step"), "linear or cosine"),
                      (dict(temperature_schedule="0:1"), "positive")):
        with pytest.raises(PikvError, match=words):
            train(train_cache, student_config, tmp_path / "bad", **kw)
    plan = D.TargetPlan(top_k=8, temperature=1.0, grid_index=0, tail="renorm", draws=0, rel_error=0.0,
                        schedule=(1e30, 0.3, "linear", 4))
    assert [plan.temperature_at(s) for s in (0, 3, 9)] == [1e30, 0.3, 0.3]  # the ends exact, no cancellation
    assert 0.3 < plan.temperature_at(2) < 1e30
    (tmp_path / "run.yaml").write_text("temperature-schedule: [2, 1, cosine]\n")  # a config file's list
    p = pikv_subprocess(["train-student", "--config", str(tmp_path / "run.yaml"), "--cache", train_cache,
                         "--student-config", student_config, "--out", str(tmp_path / "yaml"), "--max-steps", "2",
                         "--num-workers", "0", "--eval-fraction", "0.1", "--log-every", "1"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["temperature"] for r in metrics(tmp_path / "yaml") if "kd" in r] == [2.0, 1.0]
    import yaml

    from pikv_offline.cli import yaml_loader  # YAML 1.1 would read 2:1 as 121 (base 60) and 1e-3 as a string
    assert yaml.load("temperature-schedule: 2:1\nlr: 1e-3\nseed: 010\nmax-steps: 0x_\n", Loader=yaml_loader()) == \
        {"temperature-schedule": "2:1", "lr": 0.001, "seed": 10, "max-steps": "0x_"}
    with pytest.raises(PikvError, match="had --temperature-schedule 2:1:linear, this one 2:1:cosine"):
        train(train_cache, student_config, tmp_path / "s", temperature_schedule="2:1:cosine", max_steps=6,
              resume=True)
    # any other setting of the KD target too: the rest of the run would chase another objective
    for kw, words in ((dict(temperature=1.0), "had --temperature 2, this one 1"), (dict(tail="renorm"), "--tail"),
                      (dict(top_k=4), "--top-k"), (dict(divergence="jsd", tail="bucket"), "--divergence")):
        with pytest.raises(PikvError, match=words):
            train(train_cache, student_config, tmp_path / "f", max_steps=6, resume=True, **{"temperature": 2.0, **kw})
    # a default and the value it resolves to are one setting: --top-k 16 is this cache's k, --tail bucket its auto
    r = train(train_cache, student_config, tmp_path / "f", max_steps=5, resume=True, temperature=2.0, top_k=16,
              tail="bucket")
    assert r["steps"] == 5
    p = pikv_subprocess(["train-student", "--cache", train_cache, "--student-config", student_config, "--out",
                         str(tmp_path / "cli"), "--max-steps", "2", "--temperature-schedule", "1:4:cosine"])
    assert p.returncode == 2 and "4 is not in the cache's grid" in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_progressive_chain_teacher_then_medium_then_small(train_cache, corpus, tokenizer, student_config, tmp_path):
    """The recipe teacher -> medium -> small (README): a trained student's final/ (weights + the cache's
    tokenizer) is dumped as the next teacher, its cache equals it live (verify --recompute), and the small
    student trains from that cache and loads."""
    from conftest import CONTEXT
    from pikv_offline.cache.reader import open_cache
    from pikv_offline.config import DumpConfig, VerifyConfig
    from pikv_offline.teacher.dump import run as dump
    from pikv_offline.tools.fidelity import recompute

    medium_cfg = tmp_path / "medium.json"
    medium_cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 48,
                                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                      "intermediate_size": 96, "max_position_embeddings": CONTEXT,
                                      "tie_word_embeddings": True}))
    train(train_cache, str(medium_cfg), tmp_path / "medium", max_steps=4, ce_weight=0.5)
    medium = str(tmp_path / "medium" / "final")
    dump(DumpConfig(teacher=medium, data=corpus, out=str(tmp_path / "c2"), seq_len=64, top_k=8, sampled_tail=0,
                    encoding="fp16", temperatures=(1.0, 2.0), shard_seqs=8, batch_size=8, max_sequences=32))
    first, second = open_cache(train_cache), open_cache(str(tmp_path / "c2"))
    assert second.attrs.tokenizer_sha256 == first.attrs.tokenizer_sha256
    assert second.attrs.teacher["weights_sha256"] != first.attrs.teacher["weights_sha256"]
    fid = recompute(VerifyConfig(cache=str(tmp_path / "c2"), recompute=4, teacher=medium))
    assert max(r["max_logprob_err"] for r in fid["rows"] if r["mode"] == "bucket") < 0.01, fid["rows"]
    res = train(str(tmp_path / "c2"), student_config, tmp_path / "small", max_steps=4, ce_weight=0.5)
    assert res["steps"] == 4 and res["eval"]["eval_kd"] > 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "small" / "final")
