"""Several teachers: KD to the weighted mixture of caches of the same data from different teachers.

The equivalences: a cache mixed with a copy of itself trains as the single cache does; at k = V the loss
and its gradient are those of forward KL to the dense mixture (fused head and plain path alike).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import pytest
import torch

from conftest import VOCAB, pikv_subprocess
from pikv_offline.config import DumpConfig, TrainConfig
from pikv_offline.errors import PikvError
from pikv_offline.student import data as D
from pikv_offline.student.train import run


def _train(caches, student_config, out, **kw):
    for k, v in dict(max_steps=4, batch_size=4, lr=3e-3, eval_fraction=0.1, num_workers=0, log_every=1,
                     warmup_steps=1).items():
        kw.setdefault(k, v)
    return run(TrainConfig(cache=caches, student_config=student_config, out=str(out), **kw))


def _metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def full_caches(workdir, llama_teacher, gpt2_teacher, corpus):
    """Two teachers (llama, gpt2: one tokenizer) of the same data at k = V, grid 1,2, fp16 log-probs."""
    from pikv_offline.teacher.dump import run as dump

    out = []
    for name, teacher in (("llama", llama_teacher), ("gpt2", gpt2_teacher)):
        path = workdir / f"mix-fullk-{name}"
        if not path.exists():
            dump(DumpConfig(sampled_tail=0, encoding="fp16", teacher=teacher, data=corpus, out=str(path), seq_len=32,
                            top_k=VOCAB, temperatures=(1.0, 2.0), shard_seqs=4, max_sequences=4))
        out.append(str(path))
    return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_at_full_k_the_mixture_loss_and_gradient_are_kl_to_the_dense_mixture(full_caches, student_config, fused, T):
    from pikv_offline.cache.reader import open_cache
    from pikv_offline.modeling import lm_logits
    from pikv_offline.student.distiller import Distiller
    from pikv_offline.student.model import load_student

    a, b = (open_cache(p) for p in full_caches)
    pa = D.plan_targets(a, None, T, "bucket")
    (pb,) = D.plan_teachers(pa, a, [b], top_k=None, tail="bucket", divergence="forward_kl", schedule=None,
                            total_steps=1)
    ids = D.CacheIndex(a, 0.0).train
    batch = D.with_teachers(D.to_batch(D.read_rows(a, ids), a.encoding, pa), [D.read_rows(b, ids)], ((b, pb),))
    w = (0.7, 0.3)
    student, _ = load_student(None, student_config, seed=0)
    net = Distiller(student, pa, weights={"kd": 1.0, "ce": 0.0}, fused=fused, others=(pb,), teacher_weights=w)
    losses, _, n = net(batch)
    assert n > 0
    grads = torch.autograd.grad(losses["kd"], [p for p in student.parameters()])

    # the reference: dense teachers at T, their mixture, KL to the student's log-softmax at T
    h = student.base_model(input_ids=batch.input_ids, use_cache=False).last_hidden_state
    valid = batch.loss_mask[:, 1:]
    logq = torch.log_softmax(lm_logits(student, h[:, :-1][valid]).float() / T, -1)
    mix = 0
    for wj, bj in zip(w, (batch, *batch.teachers)):
        lp, tn, hid = (t[:, :-1][valid] for t in (bj.head_logprobs, bj.tnorm, bj.head_ids))
        mix = mix + wj * torch.zeros(lp.shape[0], VOCAB).scatter(-1, hid, (lp / T - tn[:, None]).exp())
    ref = (mix * (torch.log(mix) - logq)).sum() * T * T
    ref_grads = torch.autograd.grad(ref, [p for p in student.parameters()])
    torch.testing.assert_close(losses["kd"], ref, rtol=1e-4, atol=1e-3)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)
    # the per-teacher losses alone differ from it by the teachers' divergence: the gap is not zero here
    single = Distiller(student, pa, weights={"kd": 1.0, "ce": 0.0}, fused=fused)
    single_b = Distiller(student, pb, weights={"kd": 1.0, "ce": 0.0}, fused=fused)
    plain = w[0] * single(dataclasses.replace(batch, teachers=()))[0]["kd"] + w[1] * single_b(batch.teachers[0])[0]["kd"]
    assert float(plain - losses["kd"]) > 1e-3


def test_mixture_gap_is_zero_for_equal_teachers_and_positive_otherwise():
    from pikv_offline.student.losses import mixture_gap

    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(5, 12, generator=g), -1)
    ids = torch.arange(12).expand(5, 12)
    perm = torch.randperm(12, generator=g)
    assert torch.equal(mixture_gap([(ids, lp), (ids[:, perm], lp[:, perm])], (0.5, 0.5)), torch.zeros(5))
    other = torch.log_softmax(torch.randn(5, 12, generator=g), -1)
    gap = mixture_gap([(ids, lp), (ids, other)], (0.3, 0.7))
    p, q = lp.exp(), other.exp()
    m = 0.3 * p + 0.7 * q
    ref = 0.3 * (p * (p / m).log()).sum(-1) + 0.7 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(gap, ref)
    # heads of 4 that share 2 ids: a coarser partition, so a lower bound of the full divergence
    top = lambda x: x.topk(4, -1)  # noqa: E731
    (va, ia), (vb, ib) = top(lp), top(other)
    coarse = mixture_gap([(ia, va), (ib, vb)], (0.3, 0.7))
    assert (coarse <= ref + 1e-6).all() and (coarse >= 0).all()


@pytest.mark.parametrize("tail", ["sampled", "bucket"])
def test_a_cache_mixed_with_a_copy_of_itself_trains_as_the_single_cache(tail, trained_cache, student_config, tmp_path,
                                                                          workdir, llama_teacher):
    cache = trained_cache
    if tail == "sampled":  # a small sampled-tail cache of the same teacher kind
        from pikv_offline.teacher.dump import run as dump

        cache = str(workdir / "mix-sampled")
        if not os.path.exists(cache):
            dump(DumpConfig(sampled_tail=8, top_k=4, encoding="bf16", teacher=llama_teacher,
                            data=str(workdir / "corpus-train.jsonl"), out=cache, seq_len=64, temperatures=(1.0, 2.0),
                            shard_seqs=8, batch_size=8, max_sequences=48))
    copy = str(tmp_path / "copy")
    shutil.copytree(cache, copy)
    kw = dict(temperature=2.0, ce_weight=0.5, tail=tail)
    _train(cache, student_config, tmp_path / "one", **kw)
    _train([cache, copy], student_config, tmp_path / "two", teacher_weights=(0.5, 0.5), **kw)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        for k in ("kd", "ce", "eval_kd", "eval_ce"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a["step"])
    from safetensors.torch import load_file

    wa, wb = (load_file(os.path.join(tmp_path / r, "final", "model.safetensors")) for r in ("one", "two"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_teachers_train_resume_and_refuse_what_does_not_mix(full_caches, train_cache, student_config, tmp_path,
                                                                workdir, llama_teacher, corpus):
    a, b = full_caches
    r = _train([a, b], student_config, tmp_path / "run", teacher_weights=(3, 1), max_steps=3, tail="bucket",
               batch_size=1, eval_fraction=0.25, save_every=1)
    assert r["steps"] == 3 and r["last"]["kd"] > 0
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["teacher_weights"] == [0.75, 0.25] and len(saved["cache_key"].split("+")) == 2
    # a resume with other teachers or weights is refused
    shutil.rmtree(tmp_path / "run" / "final")
    shutil.rmtree(tmp_path / "run" / "checkpoint-3")
    for kw, what in (({"cache": [b, a]}, "cache"), ({"teacher_weights": (1, 1)}, "teacher-weights")):
        args = dict(cache=[a, b], teacher_weights=(3, 1), max_steps=3, tail="bucket", batch_size=1,
                    eval_fraction=0.25, resume="strict")
        args.update(kw)
        with pytest.raises(PikvError, match=what):
            _train(args.pop("cache"), student_config, tmp_path / "run", **args)
    # caches of other data, another grid, another divergence, weights of the wrong count: one line, exit 2
    from pikv_offline.teacher.dump import run as dump

    other_grid, grid124 = workdir / "mix-grid14", workdir / "mix-grid124"
    for path, grid in ((other_grid, (1.0, 4.0)), (grid124, (1.0, 2.0, 4.0))):
        if not path.exists():
            dump(DumpConfig(sampled_tail=0, encoding="fp16", teacher=llama_teacher, data=corpus, out=str(path),
                            seq_len=32, top_k=VOCAB, temperatures=grid, shard_seqs=4, max_sequences=4))
    # the command line once (one line, exit 2), the rest in process
    p = pikv_subprocess(["train-student", "--student-config", student_config, "--max-steps", "1", "--batch-size", "1",
                         "--num-workers", "0", "--eval-fraction", "0.25", "--cache", a, "--cache", train_cache,
                         "--out", str(tmp_path / "bad")], timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "differs from" in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr, p.stderr[-2000:]
    cases = [
        ([a, str(other_grid)], dict(temperature=2.0), "mix-grid14: --temperature 2.0 is not in"),
        ([str(grid124), str(other_grid)], dict(temperature_schedule="4:1"), "lacks T=2"),
        ([a, b], dict(divergence="reverse_kl", tail="bucket"), "--divergence reverse_kl"),
        ([a, b], dict(teacher_weights="1,2,3"), "3 weights for 2"),
        ([a, b], dict(teacher_weights="1,-1"), "positive"),
        ([a, a], {}, "twice"),
    ]
    for i, (caches, kw, msg) in enumerate(cases):
        with pytest.raises(PikvError, match=re.escape(msg)):
            _train(caches, student_config, tmp_path / f"bad{i}", max_steps=1, batch_size=1, eval_fraction=0.25, **kw)


def test_one_cache_trains_with_every_divergence_and_mixture_flags_need_several(train_cache, student_config,
                                                                              tmp_path):
    """The several-teachers refusal of reverse KL and JSD is for several caches only; flags of a mixture
    with one cache, and one cache named twice in another spelling, are refused."""
    for div in ("reverse_kl", "jsd"):
        r = _train([train_cache], student_config, tmp_path / div, divergence=div, tail="bucket", max_steps=1)
        assert r["steps"] == 1 and r["last"]["kd"] > 0
    for kw, msg in (({"cache": [train_cache], "teacher_weights": "5"}, "several teachers"),
                    ({"cache": [train_cache, train_cache + "/"]}, "twice"),
                    ({"cache": [train_cache, train_cache + "/../" + os.path.basename(train_cache)]}, "twice")):
        with pytest.raises(PikvError, match=msg):
            TrainConfig(student_config=student_config, out=str(tmp_path / "x"), max_steps=1, **kw)
    # huge weights are normalized without overflowing
    cfg = TrainConfig(cache=[train_cache, train_cache + "-b"], teacher_weights="1e308,1e308",
                      student_config=student_config, out=str(tmp_path / "x"), max_steps=1)
    assert cfg.teacher_weights == (0.5, 0.5)
