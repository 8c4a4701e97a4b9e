"""Stage one: stored targets equal a live teacher; ranks, elastic resume, extension, cache hits, chat masks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CONTEXT, VOCAB, pikv_subprocess, write_jsonl
from pikv_offline.cache import format as F
from pikv_offline.cache import layout as Y
from pikv_offline.cache.reader import describe, open_cache, read_root_attrs
from pikv_offline.config import DumpConfig, parse_targets
from pikv_offline.errors import PikvError
from pikv_offline.teacher import dump as dump_mod
from pikv_offline.teacher.model import logit_targets

SEQ = 64


def dump(teacher, data, out, **kw):
    kw.setdefault("seq_len", SEQ)
    kw.setdefault("top_k", 16)
    kw.setdefault("sampled_tail", 0)  # the tests of the bucket cache; the default (a sampled tail) has its own
    kw.setdefault("encoding", "fp16")
    kw.setdefault("temperatures", (1.0, 2.0, 4.0))
    kw.setdefault("shard_seqs", 4)
    kw.setdefault("batch_size", 3)
    return dump_mod.run(DumpConfig(teacher=teacher, data=data, out=str(out), **kw))


def live_logits(teacher, input_ids):
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(input_ids).long()).logits.float()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_stored_topk_equals_live_teacher(kind, request, corpus, workdir):
    teacher = request.getfixturevalue(f"{kind}_teacher")
    out = workdir / f"live-{kind}"
    res = dump(teacher, corpus, out, max_sequences=10)
    assert res["sequences"] == 10 and not res["cache_hit"]
    cache = open_cache(str(out))
    got = cache.read_all()
    np.testing.assert_array_equal(got[F.SAMPLE_ID], np.arange(10))
    logits = live_logits(teacher, got[F.INPUT_IDS])
    logprobs = torch.log_softmax(logits, -1)
    ids = torch.from_numpy(got[F.HEAD_IDS])
    stored = torch.from_numpy(got[F.HEAD_LOGPROBS])
    # The stored ids are the live top-k: the live log-probs at them are the live top-k values (the
    # order among values equal after rounding may differ, hence the sort).
    live_top = torch.topk(logprobs, 16, dim=-1).values
    at_ids = torch.sort(torch.gather(logprobs, -1, ids), dim=-1, descending=True).values
    torch.testing.assert_close(at_ids, live_top, atol=1e-5, rtol=0)
    # fp16 log-probs: relative error <= 2^-11.
    torch.testing.assert_close(stored, live_top, atol=1e-3, rtol=2 ** -10)
    assert (stored[..., :-1] >= stored[..., 1:]).all(), "top-k is sorted by probability"
    for j, t in enumerate(cache.temperatures):
        torch.testing.assert_close(torch.from_numpy(got[F.TNORM][..., j]), torch.logsumexp(logprobs / t, -1),
                                   atol=1e-4, rtol=1e-5)
    # Tempered top-k from the stored values matches the live tempered distribution.
    tempered = stored / 2.0 - torch.from_numpy(got[F.TNORM][..., 1:2])
    torch.testing.assert_close(tempered, torch.gather(torch.log_softmax(logits / 2.0, -1), -1, ids),
                               atol=2e-3, rtol=2 ** -10)


def test_full_vocab_k_sums_to_one(llama_teacher, corpus, workdir):
    out = workdir / "fullk"
    dump(llama_teacher, corpus, out, max_sequences=3, top_k=VOCAB, temperatures=(1.0,))
    got = open_cache(str(out)).read_all()
    mass = np.exp(got[F.HEAD_LOGPROBS].astype(np.float64)).sum(-1)
    np.testing.assert_allclose(mass, 1.0, atol=2e-3)
    assert F.TNORM not in open_cache(str(out)).names  # T=1 alone: its normalizer is 0, nothing stored


def test_chunked_targets_equal_plain(llama_teacher):
    model = AutoModelForCausalLM.from_pretrained(llama_teacher).eval()
    x = torch.randint(0, VOCAB, (2, 40))
    u = torch.rand(2, 40, 5)
    a = logit_targets(model, x, 8, (1.0, 2.0), u, chunk_tokens=7)
    b = logit_targets(model, x, 8, (1.0, 2.0), u, chunk_tokens=10_000)
    assert a.keys() == b.keys() == {"ids", "logprobs", "tnorm", "tail_ids", "tail_logprobs"}
    for name in a:
        torch.testing.assert_close(a[name], b[name])


@pytest.fixture(scope="module")
def one_rank_cache(llama_teacher, corpus, workdir):
    out = workdir / "one-rank"
    dump(llama_teacher, corpus, out, max_sequences=22, sampled_tail=8, targets=parse_targets(RICH[1::2]))
    return out


@pytest.fixture(scope="module")
def two_rank_cache(llama_teacher, corpus, workdir):
    out = workdir / "two-rank"
    p = pikv_subprocess(_cli_args(llama_teacher, corpus, out), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _cli_args(teacher, data, out, n=22):
    return ["dump-teacher", "--teacher", teacher, "--data", data, "--out", str(out), "--seq-len", str(SEQ),
            "--top-k", "16", "--temperatures", "1,2,4", "--shard-size", "4", "--batch-size", "3",
            "--max-sequences", str(n), "--sampled-tail", "8", "--encoding", "fp16", *RICH]


# The crash, resume and rank tests carry rich targets too: int8 encodes in the writer thread and its
# measured error is merged at each commit.
RICH = ["--targets", "hidden:0@bf16", "--targets", "kv:1@int8"]


def _assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for name in a:
        if exact or a[name].dtype.kind in "biu":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            np.testing.assert_allclose(a[name], b[name], atol=2e-3, rtol=1e-3, err_msg=name)


def test_two_ranks_equal_one_rank(one_rank_cache, two_rank_cache):
    """A unit's batches do not depend on who computes it, and the tail's draws are seeded per sample id:
    the content per sample id is bitwise that of one rank."""
    c1, c2 = open_cache(str(one_rank_cache)), open_cache(str(two_rank_cache))
    assert c2.committed_units() == list(range(6)) and c2.attrs.cache_key == c1.attrs.cache_key
    _assert_same(c1.read_all(), c2.read_all())
    assert c2.attrs.content_sha256 == c1.attrs.content_sha256


@pytest.mark.parametrize("fault", ["commit:2", "write:2"])
def test_killed_and_resumed_equals_uninterrupted(fault, llama_teacher, corpus, workdir, one_rank_cache):
    out = workdir / f"killed-{fault.replace(':', '-')}"
    p = pikv_subprocess(_cli_args(llama_teacher, corpus, out), env={"PIKV_FAULT": fault})
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    assert read_root_attrs(str(out))["complete"] is False
    with pytest.raises(PikvError, match="incomplete"):
        open_cache(str(out))
    partial = open_cache(str(out), allow_incomplete=True)
    assert partial.committed_units() == ([0, 1] if fault == "commit:2" else [0])
    p = pikv_subprocess(_cli_args(llama_teacher, corpus, out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming" in p.stdout
    _assert_same(open_cache(str(out)).read_all(), open_cache(str(one_rank_cache)).read_all())
    # the resumed dump measured its encoding error over every block, as the uninterrupted one did
    assert describe(str(out))["encoding_errors"] == describe(str(one_rank_cache))["encoding_errors"]


@pytest.mark.parametrize("resume_ranks", [1, 3])
def test_killed_at_two_ranks_resumes_at_any_world_size(resume_ranks, llama_teacher, corpus, workdir, two_rank_cache):
    """Killed at W=2 (rank 1 dies after its first unit), resumed at W=1 or W=3: every unit without a
    marker is computed again, and the content per sample id is bitwise the uninterrupted dump's."""
    import shutil

    out = workdir / f"killed-2rank-resumed-{resume_ranks}"
    shutil.rmtree(out, ignore_errors=True)
    p = pikv_subprocess(_cli_args(llama_teacher, corpus, out), nproc=2, env={"PIKV_FAULT": "commit:1@1"})
    assert p.returncode != 0
    assert read_root_attrs(str(out))["complete"] is False
    done = open_cache(str(out), allow_incomplete=True).committed_units()
    assert 1 in done and len(done) < 6
    p = pikv_subprocess(_cli_args(llama_teacher, corpus, out), nproc=resume_ranks)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stdout
    _assert_same(open_cache(str(out)).read_all(), open_cache(str(two_rank_cache)).read_all())
    assert describe(str(out))["encoding_errors"] == describe(str(two_rank_cache))["encoding_errors"]


def test_more_sequences_extend_a_complete_cache(llama_teacher, corpus, workdir):
    """The same command with a larger --max-sequences computes only the new units (and those of a shuffle
    block that grew) and ends equal to a dump of that many at once; a smaller one is a hit on a prefix."""
    import shutil

    from pikv_offline.cache import layout

    args = lambda out, n: [*_cli_args(llama_teacher, corpus, out, n=n), "--shard-size", "1"]  # noqa: E731
    block = layout.SHUFFLE_UNITS  # sequences per shuffle block at one sequence per unit
    out, direct = workdir / "extended", workdir / "extended-direct"
    for d in (out, direct):
        shutil.rmtree(d, ignore_errors=True)
    assert pikv_subprocess(args(direct, block + 6)).returncode == 0
    p = pikv_subprocess(args(out, block))  # one whole block
    assert p.returncode == 0, p.stderr[-2000:]
    before = {u: (out / Y.marker_name(u)).stat().st_mtime_ns for u in range(block)}
    p = pikv_subprocess(args(out, block + 6))
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"from {block} to {block + 6} sequences" in p.stdout and "(6 units written now)" in p.stdout, p.stdout
    assert {u: (out / Y.marker_name(u)).stat().st_mtime_ns for u in range(block)} == before, "kept units rewritten"
    _assert_same(open_cache(str(out)).read_all(), open_cache(str(direct)).read_all())
    assert open_cache(str(out)).attrs.content_sha256 == open_cache(str(direct)).attrs.content_sha256
    p = pikv_subprocess(args(out, 12))
    assert p.returncode == 0 and "cache hit" in p.stdout and "the first 12 of them" in p.stdout
    p = pikv_subprocess(args(out, block + 9))  # the last block grew again: its units are written anew
    assert p.returncode == 0 and "(9 units written now)" in p.stdout, p.stdout


def test_prepared_data_is_reused(llama_teacher, corpus, workdir, monkeypatch):
    """Tokenizing and packing land in the datasets cache: a second dump of the same data (another --out,
    other targets) does not tokenize again."""
    from pikv_offline import data as data_mod

    tally = workdir / "reuse-tally.txt"  # the preparation runs in a forked child: it counts in a file
    tally.write_text("")
    real = data_mod._tokenize_batch

    def spy(batch, **kw):
        with open(tally, "a") as f:
            f.write(f"{len(next(iter(batch.values())))}\n")
        return real(batch, **kw)

    def calls():
        return [int(x) for x in tally.read_text().split()]

    monkeypatch.setattr(data_mod, "_tokenize_batch", spy)
    data = write_jsonl(workdir / "reuse.jsonl", [{"text": f"record {i}: " + "words " * (i % 7 + 3)} for i in range(50)])
    dump(llama_teacher, data, workdir / "reuse-a", max_sequences=3)
    assert sum(calls()) == 50
    real_load = data_mod.load_records

    def load_spy(*a, **k):
        with open(tally, "a") as f:
            f.write("0\n")  # a load counts as a call of no records
        return real_load(*a, **k)

    monkeypatch.setattr(data_mod, "load_records", load_spy)
    dump(llama_teacher, data, workdir / "reuse-b", max_sequences=5, top_k=4)
    assert sum(calls()) == 50, "the second dump tokenized again"
    assert len(calls()) == 1, "the second dump opened the records (the index names the packed files)"


def test_cache_hit_skips_teacher_and_key_mismatch_is_refused(llama_teacher, corpus, workdir, monkeypatch,
                                                              one_rank_cache):
    before = sorted(os.walk(one_rank_cache))

    def no_teacher(*a, **k):
        raise AssertionError("the teacher must not be loaded on a cache hit")

    monkeypatch.setattr(dump_mod.M, "load_model", no_teacher)
    res = dump(llama_teacher, corpus, one_rank_cache, max_sequences=22, sampled_tail=8,
               targets=parse_targets(RICH[1::2]))
    assert res["cache_hit"]
    assert sorted(os.walk(one_rank_cache)) == before
    with pytest.raises(PikvError, match="different inputs"):
        dump(llama_teacher, corpus, one_rank_cache, max_sequences=22, sampled_tail=8,
             targets=parse_targets(["hidden:0@fp16", "kv:1@int8"]))
    monkeypatch.undo()
    other = workdir / "overwrite"
    dump(llama_teacher, corpus, other, max_sequences=4)
    res = dump(llama_teacher, corpus, other, max_sequences=4, top_k=8, overwrite=True)
    assert not res["cache_hit"] and open_cache(str(other)).top_k == 8
    res = dump(llama_teacher, corpus, other, max_sequences=4, top_k=8, overwrite=True)  # the same inputs
    assert res["cache_hit"], "--overwrite replaces a cache of other inputs only"


def test_tokenizer_is_saved_in_cache(one_rank_cache, tokenizer):
    tok = AutoTokenizer.from_pretrained(os.path.join(one_rank_cache, "tokenizer"))
    assert tok.get_vocab() == tokenizer.get_vocab()


def test_corrupted_chunk_is_detected(llama_teacher, corpus, workdir):
    out = workdir / "corrupt"
    dump(llama_teacher, corpus, out, max_sequences=4)
    shard_file = out / "logits" / "id_gaps" / "c" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[10] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):  # zarr's crc32c codec, on any read
        open_cache(str(out)).read_all()
    from pikv_offline.cache.verify import check_integrity

    with pytest.raises(PikvError, match="unit 0 \\(sequences \\[0, 4\\)\\) has an unreadable chunk in logits/id_gaps"):
        check_integrity(str(out))


def test_no_pack_pads_and_masks(llama_teacher, workdir):
    data = write_jsonl(workdir / "short.jsonl", [{"text": "a short line of text."}, {"text": "x " * 100}])
    out = workdir / "nopack"
    dump(llama_teacher, data, out, pack=False)
    got = open_cache(str(out)).read_all()
    first = got[F.LOSS_MASK][0]
    n = int(first.sum())
    assert 2 <= n < SEQ and first[:n].all() and not first[n:].any()
    assert len(got[F.SAMPLE_ID]) >= 3  # the long document is split, not truncated


CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"},
     {"role": "assistant", "content": "An ordered, mutable sequence."},
     {"role": "user", "content": "And a tuple?"}, {"role": "assistant", "content": "An immutable one."}],
    [{"role": "user", "content": "Name a sorting algorithm."}, {"role": "assistant", "content": "Merge sort."}],
]


@pytest.mark.parametrize("template", ["own", "fallback"])
def test_chat_loss_mask_covers_exactly_assistant_tokens(template, tokenizer, workdir, texts):
    from pikv_offline.tools.toy import make_model

    teacher = workdir / f"chat-teacher-{template}"
    tok = tokenizer
    if template == "fallback":
        from pikv_offline.tools.toy import train_tokenizer

        tok = train_tokenizer(texts, vocab_size=VOCAB, chat_template=False)
    make_model("llama", len(tok), hidden=32, layers=1, context=CONTEXT).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    data = write_jsonl(workdir / f"chat-{template}.jsonl", [{"conversations": c} for c in CHATS])
    out = workdir / f"chat-cache-{template}"
    dump(str(teacher), data, out, chat_field="conversations", pack=False, seq_len=CONTEXT)
    got = open_cache(str(out)).read_all()
    end = "<|end|>\n" if template == "own" else tok.eos_token + "\n"
    for conv, ids, mask in zip(CHATS, got[F.INPUT_IDS], got[F.LOSS_MASK]):
        runs, cur = [], []
        for i, m in zip(ids, mask):
            if m:
                cur.append(int(i))
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        want = [t["content"] + end for t in conv if t["role"] == "assistant"]
        assert [tok.decode(r) for r in runs] == want


def test_inspect_reports_bytes_per_token(one_rank_cache):
    p = pikv_subprocess(["inspect", str(one_rank_cache), "--json"])
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["complete"] and info["counts"]["committed"] == 22
    rich = {"hidden/layer_0", *(f"kv/layer_1/{p}{s}" for p in ("key", "value") for s in ("", "_scale"))}
    assert set(info["bytes_per_token"]) == set(F.ARRAY_NAMES) | rich  # this cache holds every array
    assert 0 < info["bytes_per_token"][F.HEAD_IDS] < 16 * 2  # uint16 ids, compressed
    p = pikv_subprocess(["inspect", str(one_rank_cache)])
    assert "bytes/token" in p.stdout and "complete" in p.stdout


def test_sampled_tail_is_stored_as_drawn(one_rank_cache, llama_teacher):
    cache = open_cache(str(one_rank_cache))
    assert cache.draws == 8 and cache.top_k == 16
    got = cache.read_all()
    head, ids, counts = got[F.HEAD_IDS], got[F.TAIL_IDS], got[F.TAIL_COUNTS]
    assert (counts.sum(-1) == 8).all()
    used = counts > 0
    assert not ((ids[..., :, None] == head[..., None, :]) & used[..., None]).any(), "draws lie outside the top-k"
    assert (np.diff(ids, axis=-1) >= 0).all() and not (np.diff(ids, axis=-1) == 0)[used[..., 1:]].any()
    live = torch.log_softmax(live_logits(llama_teacher, got[F.INPUT_IDS]), -1)
    want = torch.gather(live, -1, torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got[F.TAIL_LOGPROBS][used], want[used], rtol=2 ** -10, atol=1e-3)


@pytest.mark.parametrize("encoding", ["fp16", "bf16"])
def test_encodings_round_trip_within_their_declared_error(encoding):
    x = -np.random.default_rng(0).exponential(3.0, 10_000).astype(np.float32)
    back = F.decode_logprobs(F.encode_logprobs(x, encoding), encoding)
    rel = np.abs(back - x) / np.maximum(np.abs(x), 1e-30)
    assert rel.max() <= F.ENCODINGS[encoding].relative_error * 1.0001
    assert rel.max() > F.ENCODINGS[encoding].relative_error / 4  # the declared bound is not loose


def test_the_default_cache_is_compact_with_a_sampled_tail(llama_teacher, corpus, workdir):
    """`pikv dump-teacher` without target flags: top-8 + 16 draws over the grid 1,2,4, bf16; training on it
    uses the sampled tail."""
    out = workdir / "defaults"
    p = pikv_subprocess(["dump-teacher", "--teacher", llama_teacher, "--data", corpus, "--out", str(out),
                         "--seq-len", "16", "--max-sequences", "4"])
    assert p.returncode == 0, p.stderr[-2000:]
    cache = open_cache(str(out))
    assert (cache.top_k, cache.draws, cache.encoding, cache.temperatures, cache.tail_temperatures) == (
        8, 16, "bf16", [1.0, 2.0, 4.0], [1.0, 2.0, 4.0])
    from pikv_offline.student.data import plan_targets

    assert plan_targets(cache, None, 4.0, "auto").tail == "sampled"


def test_pure_sampling_and_bf16_cache(llama_teacher, corpus, workdir):
    out = workdir / "pure-sampling"
    dump(llama_teacher, corpus, out, max_sequences=6, top_k=0, sampled_tail=12, encoding="bf16")
    cache = open_cache(str(out))
    assert F.HEAD_IDS not in cache.names and cache.encoding == "bf16"
    got = cache.read_all()
    assert got[F.HEAD_IDS].shape == (6, SEQ, 0) and (got[F.TAIL_COUNTS].sum(-1) == 12).all()
    live = torch.log_softmax(live_logits(llama_teacher, got[F.INPUT_IDS]), -1)
    used = got[F.TAIL_COUNTS] > 0
    want = torch.gather(live, -1, torch.from_numpy(got[F.TAIL_IDS])).numpy()
    np.testing.assert_allclose(got[F.TAIL_LOGPROBS][used], want[used], rtol=2 ** -7, atol=1e-3)
    np.testing.assert_allclose(got[F.TNORM][..., 1:], torch.stack(
        [torch.logsumexp(live / t, -1) for t in (2.0, 4.0)], -1).numpy(), rtol=2 ** -10, atol=1e-3)
    # Slot j drew at the grid's (j mod 3)-th temperature (the default proposal) with uniform column j:
    # an inverse CDF of the live p_T in float64 gives the same ids, but for a rare tie at a CDF step.
    from pikv_offline.teacher.dump import tail_uniforms

    assert cache.tail_temperatures == [1.0, 2.0, 4.0]
    u = torch.from_numpy(tail_uniforms(cache.attrs.cache_key, got[F.SAMPLE_ID], SEQ, 12)).double()
    want_ids = torch.empty(u.shape, dtype=torch.long)
    for j, t in enumerate(F.tail_slot_temperatures(cache.tail_temperatures, 12)):
        cdf = torch.softmax(live.double() / t, -1).cumsum(-1)
        want_ids[..., j] = torch.searchsorted(cdf, (u[..., j] * cdf[..., -1]).unsqueeze(-1), right=True)[..., 0]
    stored = got[F.TAIL_IDS].reshape(-1, 12)
    agree = [sorted(want_ids.reshape(-1, 12)[r].tolist()) ==
             sorted(np.repeat(stored[r], got[F.TAIL_COUNTS].reshape(-1, 12)[r]).tolist()) for r in range(len(stored))]
    assert np.mean(agree) > 0.99, np.mean(agree)


def test_verify_passes_a_good_cache_and_names_a_corrupt_shard(two_rank_cache, workdir):
    import shutil

    p = pikv_subprocess(["verify", str(two_rank_cache)])
    assert p.returncode == 0 and p.stdout.startswith("ok:"), p.stderr[-2000:]
    bad = workdir / "verify-corrupt"
    shutil.copytree(two_rank_cache, bad)
    chunk = bad / "logits" / "tail_logprobs" / "c" / "3" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    p = pikv_subprocess(["verify", str(bad)])
    assert p.returncode == 2 and "unit 3 (sequences [12, 16))" in p.stderr and "unreadable chunk" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_verify_catches_inconsistent_metadata(one_rank_cache, workdir):
    import shutil

    import zarr

    from pikv_offline.config import VerifyConfig
    from pikv_offline.tools.fidelity import run

    bad = workdir / "verify-meta"
    shutil.copytree(one_rank_cache, bad)
    marker = bad / Y.marker_name(4)
    text = marker.read_text()
    marker.unlink()
    with pytest.raises(PikvError, match="1 of its 6 units are not committed \\(first: unit 4, sequences \\(16, 20\\)\\), "
                                        "yet the cache is marked complete"):
        run(VerifyConfig(cache=str(bad)))
    marker.write_text(text.replace('"loss_tokens": ', '"loss_tokens": 1'))
    with pytest.raises(PikvError, match="unit 4 .* do not match its marker's hash and token count"):
        run(VerifyConfig(cache=str(bad)))
    marker.write_text(text)
    ids = zarr.open_array(str(bad / F.SAMPLE_ID), mode="r+")
    first = ids[0:2]
    ids[0:2] = first[::-1]
    with pytest.raises(PikvError, match="unit 0 .* sample ids are not the unit's"):
        run(VerifyConfig(cache=str(bad)))
    ids[0:2] = first
    marker.write_text("{not json")
    with pytest.raises(PikvError, match="u-00000004.json: the unit marker is not valid JSON"):
        run(VerifyConfig(cache=str(bad)))


def test_verify_recompute_measures_fidelity(one_rank_cache, llama_teacher, gpt2_teacher, workdir, tokenizer):
    from pikv_offline.config import VerifyConfig
    from pikv_offline.tools.fidelity import run
    from pikv_offline.tools.toy import make_model

    student = workdir / "verify-student"
    make_model("llama", len(tokenizer), hidden=32, layers=1, context=CONTEXT, seed=4).save_pretrained(student)
    full = workdir / "verify-fullk"
    dump(llama_teacher, _corpus_of(one_rank_cache), full, max_sequences=4, top_k=VOCAB, temperatures=(1.0, 2.0))
    res = run(VerifyConfig(cache=str(full), recompute=3, teacher=llama_teacher, student=str(student)))
    rows = {(r["mode"], r["T"]): r for r in res["recompute"]["rows"]}
    assert res["recompute"]["sequences"] == 3
    for T in (1.0, 2.0):  # k = V: the bucket loss is full KD up to fp16 storage
        assert rows["bucket", T]["max_logprob_err"] < 2e-2 and rows["bucket", T]["kl"] < 1e-4
        assert rows["bucket", T]["angle_deg"] < 1.0
    res = run(VerifyConfig(cache=str(one_rank_cache), recompute=4, teacher=llama_teacher, student=str(student)))
    rows = {(r["mode"], r["T"]): r for r in res["recompute"]["rows"]}
    assert set(rows) == {(m, t) for m in ("bucket", "renorm", "sampled") for t in (1.0, 2.0, 4.0)}
    assert all(r["kl"] < 1e-3 for (m, t), r in rows.items() if m != "sampled")
    assert all(r["kl"] > -1e-8 for r in rows.values())  # a KL, up to float rounding
    # A random teacher is nearly uniform: 8 draws barely sample its tail, so only the exact modes are bounded.
    assert all(r["angle_deg"] < 90 for (m, t), r in rows.items() if m != "sampled")
    assert res["recompute"]["tail_draws_equal"] > 0.99  # the live teacher redraws the stored tail
    # A consistently rewritten proposal (key and markers recomputed, as a forger would) is caught by the redraw.
    import dataclasses
    import shutil

    import zarr

    forged = workdir / "verify-forged-proposal"
    shutil.rmtree(forged, ignore_errors=True)
    shutil.copytree(one_rank_cache, forged)
    root = zarr.open_group(str(forged), mode="r+")
    attrs = dict(root.attrs[Y.ROOT_ATTR])
    attrs["targets"] = {**attrs["targets"], "logits": {**attrs["targets"]["logits"], "tail_temperatures": [4.0]}}
    attrs["cache_key"] = Y.RootAttrs(**{k: v for k, v in attrs.items()
                                        if k in Y.RootAttrs.__dataclass_fields__}).recomputed_key()
    root.attrs[Y.ROOT_ATTR] = attrs
    for u in range(Y.n_units(attrs["counts"]["sequences"], attrs["unit_seqs"])):
        Y.write_marker(str(forged), dataclasses.replace(Y.read_marker(str(forged), u), cache_key=attrs["cache_key"]))
    with pytest.raises(PikvError, match="stored tail draws of .* are not the live teacher's"):
        run(VerifyConfig(cache=str(forged), recompute=4, teacher=llama_teacher))
    with pytest.raises(PikvError, match="not the teacher that wrote this cache"):
        run(VerifyConfig(cache=str(one_rank_cache), recompute=2, teacher=gpt2_teacher))


def _corpus_of(cache_dir) -> str:
    return open_cache(str(cache_dir)).attrs.data["data"]


@pytest.mark.parametrize("array", [F.HEAD_LOGPROBS, F.TNORM, F.TAIL_COUNTS, F.INPUT_IDS])
def test_a_deleted_chunk_file_is_damage_not_zeros(array, one_rank_cache, workdir, student_config):
    """Every open checks that the file of each zarr shard holding committed rows exists: a deleted one
    would read back as zeros (zarr's fill value) and train silently on them."""
    import shutil

    bad = workdir / f"deleted-{array.replace('/', '-')}"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(one_rank_cache, bad)
    c = bad / array / "c"
    victim = next(f for f in c.rglob("*") if f.is_file() and f.relative_to(c).parts[0] == "1")  # unit 1: [4, 8)
    victim.unlink()
    with pytest.raises(PikvError, match=f"{array}: the data of unit 1 \\(sequences \\[4, 8\\)\\) is missing"):
        open_cache(str(bad))
    p = pikv_subprocess(["train-student", "--cache", str(bad), "--student-config", student_config, "--out",
                         str(bad) + "-run", "--max-steps", "1", "--num-workers", "0"])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "is missing" in lines[0], p.stderr


def test_a_deleted_array_zarr_json_is_one_line(one_rank_cache, workdir):
    import shutil

    bad = workdir / "deleted-array-json"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(one_rank_cache, bad)
    (bad / "logits" / "id_gaps" / "zarr.json").unlink()
    p = pikv_subprocess(["inspect", str(bad)])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "logits/id_gaps: the array cannot be opened" in lines[0], p.stderr


def test_ten_kills_in_a_row_then_equal_to_uninterrupted(llama_teacher, corpus, workdir):
    """SIGKILL before the first forward, after a unit's data and before its marker, after a marker, and
    just before the final commit, ten times in a row, resuming each time: the cache ends bitwise equal,
    per sample id, to an uninterrupted dump."""
    import shutil

    args = lambda out: [*_cli_args(llama_teacher, corpus, out), "--shard-size", "2"]  # noqa: E731 (11 units)
    clean = workdir / "kills-clean"
    shutil.rmtree(clean, ignore_errors=True)
    assert pikv_subprocess(args(clean)).returncode == 0
    out = workdir / "kills"
    shutil.rmtree(out, ignore_errors=True)
    points = ["forward:1", "write:1", "commit:1", "write:2", "commit:2", "write:1", "commit:3", "forward:1",
              "commit:1", "write:3"]
    for point in points:
        p = pikv_subprocess(args(out), env={"PIKV_FAULT": point})
        assert p.returncode == -9, (point, p.returncode, p.stderr[-2000:])
    done = len(open_cache(str(out), allow_incomplete=True).committed_units())
    assert 0 < done < 11
    p = pikv_subprocess(args(out), env={"PIKV_FAULT": "complete:1"})  # every unit in, killed at the last write
    assert p.returncode == -9 and read_root_attrs(str(out))["complete"] is False
    p = pikv_subprocess(args(out))
    assert p.returncode == 0 and "(0 units written now)" in p.stdout, p.stdout[-2000:]
    _assert_same(open_cache(str(out)).read_all(), open_cache(str(clean)).read_all())
    assert open_cache(str(out)).attrs.content_sha256 == open_cache(str(clean)).attrs.content_sha256


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.startswith("error:")]


def test_a_full_disk_stops_with_one_line_and_resumes(llama_teacher, corpus, workdir, one_rank_cache):
    """ENOSPC while a unit is written (injected at the writer): one line naming the space needed, the
    committed units intact, and the same command resumes once there is space."""
    import shutil

    out = workdir / "enospc"
    shutil.rmtree(out, ignore_errors=True)
    p = pikv_subprocess(_cli_args(llama_teacher, corpus, out), env={"PIKV_FAULT": "enospc:3"})
    errors = _error_lines(p.stderr)
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "is full" in errors[0] and "more are needed for the 4 units not committed yet" in errors[0]
    assert "the 2 committed units are kept" in errors[0]
    assert open_cache(str(out), allow_incomplete=True).committed_units() == [0, 1]
    p = pikv_subprocess(_cli_args(llama_teacher, corpus, out))
    assert p.returncode == 0 and "resuming" in p.stdout, p.stderr[-2000:]
    _assert_same(open_cache(str(out)).read_all(), open_cache(str(one_rank_cache)).read_all())


def test_a_real_full_disk(llama_teacher, corpus, workdir):
    """The same on a 300 KiB tmpfs (root can mount one; skipped where it cannot)."""
    import subprocess as sp

    mnt = workdir / "tiny-disk"
    mnt.mkdir(exist_ok=True)
    if sp.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        p = pikv_subprocess([*_cli_args(llama_teacher, corpus, mnt / "c"), "--max-cache-gb", "1"])
        errors = _error_lines(p.stderr)
        assert p.returncode == 2 and len(errors) == 1 and "is full" in errors[0], p.stderr[-2000:]
        assert "Traceback" not in p.stderr
        assert read_root_attrs(str(mnt / "c")) is None or not read_root_attrs(str(mnt / "c"))["complete"]
    finally:
        sp.run(["umount", str(mnt)])


def test_two_dumps_on_one_out_do_not_interleave(llama_teacher, corpus, workdir):
    """A dump holds --out for its life: a second one is refused, naming the first."""
    import shutil

    from pikv_offline import lock

    out = workdir / "locked"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    with lock.hold(str(out / Y.LOCK_FILE), what="test", by="dump"):  # the first dump, still running
        p = pikv_subprocess(_cli_args(llama_teacher, corpus, out))
    errors = _error_lines(p.stderr)
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-2000:]
    assert f"--out {out} is in use by another dump (pid {os.getpid()} on" in errors[0]
    assert read_root_attrs(str(out)) is None, "the refused dump wrote nothing"
    assert pikv_subprocess(_cli_args(llama_teacher, corpus, out, n=4)).returncode == 0  # free again


def test_a_flipped_byte_stops_training_with_one_line(one_rank_cache, workdir, student_config):
    """The crc32c of an inner chunk fails while training reads it: one line naming the array and sequences."""
    import shutil

    bad = workdir / "flipped-train"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(one_rank_cache, bad)
    for f in (bad / "logits" / "logprobs" / "c").rglob("*"):
        if f.is_file():
            data = bytearray(f.read_bytes())
            data[len(data) // 3] ^= 0x10
            f.write_bytes(bytes(data))
    p = pikv_subprocess(["train-student", "--cache", str(bad), "--student-config", student_config, "--out",
                         str(workdir / "flipped-run"), "--max-steps", "2", "--num-workers", "0", "--batch-size", "4"])
    errors = _error_lines(p.stderr)
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "logits/logprobs: the stored data of sequences" in errors[0] and "does not read" in errors[0]


def test_records_that_are_not_text_are_skipped_and_counted(llama_teacher, workdir):
    data = write_jsonl(workdir / "mixed.jsonl", [{"text": "a line of real text here."}, {"text": 5},
                                                  {"text": "more text, and some more."}, {"text": ["a"]}])
    p = pikv_subprocess(["dump-teacher", "--teacher", llama_teacher, "--data", data, "--out",
                         str(workdir / "mixed-cache"), "--seq-len", "8", "--top-k", "4"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "skipped 2 records whose 'text' is not text" in p.stdout


def test_streaming_reads_only_what_it_needs_and_packs_the_same(llama_teacher, corpus, workdir, tokenizer):
    """--streaming packs the records as they come (here a local file read as a stream), stops at
    --max-sequences, and gives the same rows as the prepared dataset."""
    from pikv_offline.data import prepare
    from pikv_offline.modeling import tokenizer_hash

    kw = dict(data=corpus, split="train", data_config=None, tokenizer=tokenizer, tokenizer_sha256=tokenizer_hash(tokenizer),
              text_field="text", chat_field=None, seq_len=SEQ, pack=True, max_sequences=7)
    streamed, prepared = prepare(**kw, streaming=True), prepare(**kw)
    assert streamed.n == prepared.n == 7 and len(streamed.dataset) == 7 and len(prepared.dataset) > 7
    assert streamed.fingerprint == prepared.fingerprint
    for a, b in zip(streamed.rows(0, 7), prepared.rows(0, 7)):
        np.testing.assert_array_equal(a, b)


def test_the_lock_outlives_the_creation_of_the_cache(llama_teacher, corpus, workdir):
    """The dump creates the cache while it holds the lock file in it: the file must stay (zarr's mode "w"
    cleared the folder once, so a second dump locked a new file and ran alongside)."""
    out = workdir / "lock-kept"
    p = pikv_subprocess(_cli_args(llama_teacher, corpus, out, n=4), env={"PIKV_FAULT": "forward:1"})
    assert p.returncode == -9, p.stderr[-2000:]
    assert (out / Y.LOCK_FILE).is_file() and (out / "zarr.json").is_file()
