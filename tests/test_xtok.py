"""Cross-tokenizer pieces: exact token bytes, the student's tokens of the teacher's text and the positions
where both predict after the same text, and the ULD loss."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pikv_offline.student.losses import kd_rows
from pikv_offline.student.xtok import matched_kd_rows, retokenize, token_bytes, uld_rows, vocab_map


def _sentencepiece_style(texts, vocab_size=300, prepend="never"):
    """A Llama-2-like tokenizer: BPE over pieces with '▁' for spaces and byte fallback; prepend="first": a
    space before each text, as Llama 2 and Mistral do (SentencePiece's dummy prefix)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prepend != "never" else []))
    specials = ["<unk>", "</s>", "<pad>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 259, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    return fast


@pytest.fixture(scope="module")
def tokenizers(texts, tokenizer):
    from pikv_offline.tools.toy import train_tokenizer

    accents = "".join("a" + c + " " for c in "éèêëàâäîïôöûüç") * 50
    return {"bpe512": tokenizer, "bpe300": train_tokenizer(texts[:200], vocab_size=300),
            "spiece": _sentencepiece_style(texts[:200]), "spfirst": _sentencepiece_style(texts[:200], prepend="first"),
            # byte-level BPE whose one merge joins a letter and the first byte of an accented character ('aÃ'):
            # the next token starts inside that character, at a byte no character offset names
            "midchar": train_tokenizer([accents] * 50, vocab_size=263, chat_template=False)}


SAMPLES = ["Return the sum of a and b.\n\n    Raises ValueError if é ≠ 0 — naïve 🙂 case.", "  two  spaces\tand tabs\n",
           "Voilà: café, déjà vu, naïve façade, à la carte."]


@pytest.mark.parametrize("name", ["bpe512", "bpe300", "spiece", "midchar"])
def test_token_bytes_rebuild_the_text_exactly(tokenizers, texts, name):
    tok = tokenizers[name]
    table = token_bytes(tok)
    assert table[tok.eos_token_id] is None
    for text in SAMPLES + texts[:20]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")


@pytest.mark.parametrize("teacher,student", [("bpe512", "bpe300"), ("bpe512", "spiece"), ("spiece", "bpe512"),
                                             ("bpe512", "bpe512"), ("bpe512", "midchar"), ("bpe512", "spfirst"),
                                             ("spfirst", "bpe300")])
def test_retokenized_sequence_holds_the_same_text_and_aligned_positions_share_their_prefix(tokenizers, texts,
                                                                                            teacher, student):
    t_tok, s_tok = tokenizers[teacher], tokenizers[student]
    t_table, s_table = token_bytes(t_tok), token_bytes(s_tok)
    eos = t_tok.eos_token_id
    docs = SAMPLES + texts[:6]
    stream = [i for d in docs for i in t_tok(d, add_special_tokens=False)["input_ids"] + [eos]]
    L = 96
    dummy = int(b"".join(s_table[i] for i in s_tok("a", add_special_tokens=False)["input_ids"]) == b" a")
    for start in range(0, len(stream) - L, 37):  # packed windows cut anywhere, also inside a document
        t_ids = np.asarray(stream[start:start + L])
        t_mask = np.ones(L, bool)
        t_mask[:5] = False
        ids, mask, pos = retokenize(t_ids, t_mask, t_table, s_tok, L * 4)
        n = int((ids != s_tok.pad_token_id).sum())
        assert n > 0 and not mask[n:].any()

        def text_of(table, seq, upto):  # the bytes of tokens [0, upto), a document boundary as one marker
            return b"".join(b"\x00EOS\x00" if table[i] is None else table[i] for i in seq[:upto])

        aligned = np.flatnonzero(pos >= 0)
        assert len(aligned) > n // 4, (len(aligned), n)
        eos_mark = b"\x00EOS\x00"
        for t in aligned:  # student token t+1 and teacher token u+1 start after the same text of one document
            u = pos[t]
            s_prefix, t_prefix = text_of(s_table, ids, t + 1), text_of(t_table, t_ids, u + 1)
            assert s_prefix.count(eos_mark) == t_prefix.count(eos_mark)
            s_seg, t_seg = s_prefix.split(eos_mark)[-1][dummy:], t_prefix.split(eos_mark)[-1]
            # the student's text of a window drops a character cut at its start (at most 3 bytes)
            assert t_seg.endswith(s_seg) and len(t_seg) - len(s_seg) <= 3, (s_seg[-30:], t_seg[-30:])
        if teacher == student:  # the same tokenizer: almost every position aligned (a word cut at the window's
            # edges may merge otherwise, and byte-level BPE may split a character)
            assert (pos[:n - 1] >= 0).mean() > 0.85


def test_uld_is_the_sorted_l1_distance_and_ignores_which_ids_carry_the_mass():
    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(6, 40, generator=g) * 2, torch.randn(6, 25, generator=g) * 2
    for T in (1.0, 2.0):
        lp = torch.log_softmax(t_logits, -1)
        tnorm = torch.logsumexp(lp / T, -1)
        head = lp.sort(-1, descending=True).values  # k = V: the whole teacher, sorted, no tail left
        got = uld_rows(s_logits, head, tnorm, T)
        p = torch.softmax(t_logits / T, -1).sort(-1, descending=True).values
        q = torch.softmax(s_logits / T, -1).sort(-1, descending=True).values
        q = torch.cat([q, torch.zeros(6, 15)], -1)  # the smaller vocabulary padded with zeros
        torch.testing.assert_close(got, (p - q).abs().sum(-1), rtol=1e-5, atol=1e-6)
        perm = torch.randperm(25, generator=g)
        torch.testing.assert_close(uld_rows(s_logits[:, perm], head, tnorm, T), got)
    # a student equal to the teacher up to a relabelling of ids scores 0
    perm = torch.randperm(40, generator=g)
    lp = torch.log_softmax(t_logits, -1)
    head = lp.sort(-1, descending=True).values[:, :8]
    assert uld_rows(t_logits[:, perm], head, torch.zeros(6), 1.0).abs().max() < 1e-5


def test_matched_kd_is_the_bucket_loss_for_one_vocabulary_and_kl_on_the_coarsened_events_for_two():
    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(6, 40, generator=g) * 2, torch.randn(6, 30, generator=g) * 2
    lp = torch.log_softmax(t_logits, -1)
    head_lp, head_ids = lp.topk(8, dim=-1)
    for T in (1.0, 2.0):
        tnorm = torch.logsumexp(lp / T, -1)
        s_lsm = torch.log_softmax(t_logits * 0.5 / T, -1)
        # one vocabulary (every id matched to itself): the plain bucket loss, value and gradient
        ids = head_ids
        x = s_lsm.detach().requires_grad_(True)
        got = matched_kd_rows(torch.gather(x, 1, ids), ids, torch.gather(lp, 1, ids), tnorm, T)
        y = s_lsm.detach().requires_grad_(True)
        ref = kd_rows(y, ids, torch.gather(lp, 1, ids), tnorm, temperature=T, tail="bucket")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        got.sum().backward(), ref.sum().backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
        # two vocabularies: teacher id i is student id mapping[i] or unknown to the student, and some teacher
        # ids spell the same student token (their probability pools); the loss is KL between the two
        # distributions on the events {each matched student id} + {everything else}, dense
        mapping = torch.randperm(40, generator=g)
        mapping[mapping >= 30] = -1
        mapping[head_ids[:, 1]] = mapping[head_ids[:, 0]]  # the top two head ids of each row: one student token
        s_ids = mapping[head_ids]
        x = torch.log_softmax(s_logits / T, -1).detach().requires_grad_(True)
        got = matched_kd_rows(torch.gather(x, 1, s_ids.clamp_min(0)), s_ids, head_lp, tnorm, T)
        p_T, q_T = torch.softmax(t_logits / T, -1), torch.softmax(s_logits / T, -1)
        for r in range(6):
            pooled = {}
            for i, j in zip(head_ids[r].tolist(), s_ids[r].tolist()):
                if j >= 0:
                    pooled[j] = pooled.get(j, 0.0) + float(p_T[r, i])
            pm, qm = list(pooled.values()), [float(q_T[r, j]) for j in pooled]
            p_ev, q_ev = torch.tensor(pm + [1 - sum(pm)]), torch.tensor(qm + [1 - sum(qm)])
            kl = float((p_ev * (p_ev / q_ev).log()).sum())
            assert float(got[r].detach()) == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert (got >= -1e-6).all()
        got.sum().backward()
        assert torch.isfinite(x.grad).all()
    # no matched id at a position: the loss is 0 there (one event each, mass 1 on both sides)
    none = matched_kd_rows(torch.zeros(2, 8), torch.full((2, 8), -1), head_lp[:2], tnorm[:2], 1.0)
    assert none.abs().max() < 1e-6


def test_vocab_map_matches_the_same_bytes_on_the_id_the_student_writes(tokenizers):
    from pikv_offline.student.xtok import byte_fallback_ids

    t_tok, s_tok = tokenizers["bpe512"], tokenizers["spiece"]
    t_table, s_table = token_bytes(t_tok), token_bytes(s_tok)
    fallback = byte_fallback_ids(s_tok)
    assert len(fallback) == 256
    m = vocab_map(t_table, s_table, t_tok.eos_token_id, s_tok.eos_token_id, fallback)
    hit = np.flatnonzero(m >= 0)
    assert m[t_tok.eos_token_id] == s_tok.eos_token_id
    for i in hit:
        if i != t_tok.eos_token_id:
            assert t_table[i] == s_table[m[i]]
    # every single byte is in both (byte-level alphabet, byte fallback): at least those match
    assert len(hit) > 256 * 0.9
    # a letter goes to the piece the student's tokenizer writes for it, not to its byte-fallback twin
    a = t_tok("a", add_special_tokens=False)["input_ids"]
    assert m[a[0]] == s_tok("a", add_special_tokens=False)["input_ids"][0] and m[a[0]] not in fallback
    same = vocab_map(t_table, t_table, t_tok.eos_token_id, t_tok.eos_token_id)
    assert all(same[i] == i for i in range(len(t_table)) if t_table[i] is not None)
    # a SentencePiece teacher's piece and its byte-fallback twin both map to the student's one id
    sp = token_bytes(s_tok)
    both = vocab_map(sp, sp, s_tok.eos_token_id, s_tok.eos_token_id, fallback)
    twin = next(i for i in fallback if sp[i] == b"a")
    assert both[twin] == both[s_tok("a", add_special_tokens=False)["input_ids"][0]] not in fallback


def test_the_texts_special_token_strings_stay_text_and_a_normalizing_student_is_refused(tokenizers):
    import copy

    from tokenizers import normalizers

    from pikv_offline.errors import PikvError

    t_tok, s_tok = tokenizers["bpe512"], tokenizers["spiece"]
    text = "Use <s>old</s> and <|endoftext|> or <pad> here."
    t_ids = np.asarray(t_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    assert t_tok.eos_token_id not in t_ids.tolist()  # the teacher's cache holds them as plain text
    ids, mask, pos = retokenize(t_ids, np.ones(len(t_ids), bool), token_bytes(t_tok), s_tok, 4 * len(t_ids))
    n = int(mask.sum())
    assert not ({s_tok.eos_token_id, s_tok.pad_token_id} & set(ids[:n].tolist()))
    assert b"".join(token_bytes(s_tok)[i] for i in ids[:n]) == text.encode()
    odd = copy.deepcopy(tokenizers["bpe300"])
    odd.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(PikvError, match="normalizer"):
        retokenize(t_ids, np.ones(len(t_ids), bool), token_bytes(t_tok), odd, 4 * len(t_ids))


def test_a_dummy_prefix_after_each_added_token_is_followed(texts, tokenizers):
    """SentencePiece with prepend_scheme "always" puts a dummy space before each split, also after an added
    token: the text is still spelled, and the student's next-token events line up with the teacher's."""
    s_tok = _sentencepiece_style(texts[:200], prepend="always")
    s_tok.add_tokens(["<mytok>"])
    t_tok = tokenizers["bpe512"]
    text = "see <mytok>here and <mytok> there, then more text."
    t_ids = np.asarray(t_tok(text, add_special_tokens=False)["input_ids"])
    ids, mask, pos = retokenize(t_ids, np.ones(len(t_ids), bool), token_bytes(t_tok), s_tok, 4 * len(t_ids))
    s_table, t_table = token_bytes(s_tok), token_bytes(t_tok)
    assert (pos >= 0).sum() >= 5
    for t in np.flatnonzero(pos >= 0):  # the teacher's prefix, spaces aside, is the student's
        u = pos[t]
        s_prefix = b"".join(s_table[i] for i in ids[:t + 1]).replace(b" ", b"")
        assert s_prefix == b"".join(t_table[i] for i in t_ids[:u + 1]).replace(b" ", b"")


def test_an_unsupported_tokenizer_is_refused_in_one_line(tokenizers):
    from tokenizers import decoders

    from pikv_offline.errors import PikvError

    tok = tokenizers["bpe300"]
    import copy

    odd = copy.deepcopy(tok)
    odd.backend_tokenizer.decoder = decoders.WordPiece()
    with pytest.raises(PikvError, match="byte-level BPE or SentencePiece"):
        token_bytes(odd)


def test_a_student_with_its_own_tokenizer_trains_from_the_cache_and_saves_its_tokenizer(tokenizers, trained_cache,
                                                                                          tmp_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import pikv_subprocess
    from pikv_offline.config import TrainConfig
    from pikv_offline.errors import PikvError
    from pikv_offline.student.train import run

    tok_dir = tmp_path / "student-tok"
    tokenizers["spiece"].save_pretrained(tok_dir)
    n_tok = len(tokenizers["spiece"])
    cfg_path = tmp_path / "student.json"
    cfg_path.write_text(json.dumps({"model_type": "llama", "vocab_size": n_tok, "hidden_size": 32,
                                    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "intermediate_size": 64, "max_position_embeddings": 256,
                                    "tie_word_embeddings": True}))
    kw = dict(cache=trained_cache, student_config=str(cfg_path), student_tokenizer=str(tok_dir), max_steps=12,
              batch_size=4, lr=1e-2, eval_fraction=0.1, num_workers=0, log_every=1, warmup_steps=1, ce_weight=0.5,
              temperature=2.0)
    r = run(TrainConfig(out=str(tmp_path / "run"), **kw))
    steps = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl") if '"kd"' in x and "eval" not in x]
    assert r["eval"]["eval_kd"] > 0 and steps[-1]["kd"] < steps[0]["kd"]
    final = tmp_path / "run" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    assert len(tok) == n_tok and tok("a b")["input_ids"] == tokenizers["spiece"]("a b")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.get_output_embeddings().weight.shape[0] == n_tok
    # pikv eval --cross-tokenizer gives the training's own final eval
    p = pikv_subprocess(["eval", "--cache", trained_cache, "--student", str(final), "--cross-tokenizer",
                         "--eval-fraction", "0.1", "--temperature", "2", "--json"], timeout=120)
    assert p.returncode == 0, p.stderr[-1500:]
    ev = json.loads(p.stdout.strip().splitlines()[-1])
    assert ev["eval_ce"] == pytest.approx(r["eval"]["eval_ce"], rel=1e-4)
    assert ev["eval_kd"] == pytest.approx(r["eval"]["eval_kd"], rel=1e-4)
    assert ev["eval_top1"] == pytest.approx(r["eval"]["eval_top1"]) and 0 <= ev["eval_top1"] <= 1
    # the other cross loss changes the KD figure only
    from pikv_offline.config import EvalConfig
    from pikv_offline.student.evaluate import run as evaluate

    uld = evaluate(EvalConfig(cache=trained_cache, student=str(final), cross_tokenizer=True, cross_loss="uld",
                              eval_fraction=0.1, temperature=2.0))
    assert uld["eval_ce"] == pytest.approx(ev["eval_ce"], rel=1e-6) and uld["eval_kd"] != pytest.approx(ev["eval_kd"])
    # the same run in the worker process reads the same batches (the tokenizers load there); a tokenizer folder
    # of links (a hub snapshot's) is copied into final/
    linked = tmp_path / "student-tok-links"
    linked.mkdir()
    for f in os.listdir(tok_dir):
        os.symlink(os.path.abspath(tok_dir / f), linked / f)
    r2 = run(TrainConfig(out=str(tmp_path / "run-worker"), **{**kw, "num_workers": 1, "max_steps": 2,
                                                               "student_tokenizer": str(linked)}))
    first = [json.loads(x) for x in open(tmp_path / "run-worker" / "metrics.jsonl")][0]
    assert first["kd"] == pytest.approx(steps[0]["kd"], rel=1e-5) and r2["steps"] == 2
    assert len(AutoTokenizer.from_pretrained(tmp_path / "run-worker" / "final")) == n_tok
    r_more = run(TrainConfig(out=str(tmp_path / "run"), **{**kw, "max_steps": 13, "cross_loss": "match",
                                                           "resume": "strict"}))  # the default, spelled out
    assert r_more["steps"] == 13
    with pytest.raises(PikvError, match="had --cross-loss match, this one uld"):
        run(TrainConfig(out=str(tmp_path / "run"), **{**kw, "max_steps": 14, "cross_loss": "uld", "resume": "strict"}))
    r3 = run(TrainConfig(out=str(tmp_path / "run-uld"), **{**kw, "max_steps": 2, "cross_loss": "uld"}))
    assert r3["steps"] == 2 and 0 < r3["eval"]["eval_kd"] <= 2  # a sorted L1 distance of distributions: <= 2
    # what cannot work is refused in one line (the command line once; in process otherwise)
    small = tmp_path / "small.json"
    small.write_text(cfg_path.read_text().replace(f'"vocab_size": {n_tok}', '"vocab_size": 100'))
    p = pikv_subprocess(["train-student", "--cache", trained_cache, "--max-steps", "1", "--num-workers", "0",
                         "--student-config", str(small), "--student-tokenizer", str(tok_dir), "--out",
                         str(tmp_path / "bad")], timeout=120)
    assert p.returncode == 2 and "only 100" in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr, \
        p.stderr[-1500:]
    for kw2, msg in ((dict(student_tokenizer=str(tmp_path / "none")), "not a folder"),
                     (dict(hidden_weight=1.0), "--hidden-weight"),
                     (dict(tail="renorm"), "drop --divergence forward_kl / --tail renorm"),
                     (dict(student_tokenizer=None, cross_loss="uld"), "needs --student-tokenizer")):
        with pytest.raises(PikvError, match=msg):
            run(TrainConfig(out=str(tmp_path / "bad2"), **{**kw, "max_steps": 1, **kw2}))


def test_cross_match_on_the_fused_head_equals_the_plain_path(tokenizer):
    """The exact-match loss through fused.py (no [N, V] float32 logits) == the plain log-softmax: KD, CE,
    top-1 and every gradient, at T = 1 and 2, in one chunk and in chunks of 7 positions."""
    from pikv_offline.student.data import Batch, TargetPlan
    from pikv_offline.student.distiller import Distiller
    from pikv_offline.tools.toy import make_model

    student = make_model("llama", len(tokenizer), hidden=32, layers=1, context=64, seed=3)
    g = torch.Generator().manual_seed(1)
    b, length, k, v = 3, 20, 6, len(tokenizer)
    t_lp = torch.log_softmax(torch.randn(b, length, v, generator=g) * 2, -1)
    head_lp, head_ids = t_lp.topk(k, dim=-1)
    head_ids = torch.where(torch.rand(b, length, k, generator=g) < 0.3, -1, head_ids)  # ids the student lacks
    for T in (1.0, 2.0):
        batch = Batch(input_ids=torch.randint(0, v, (b, length), generator=g),
                      loss_mask=torch.rand(b, length, generator=g) > 0.2, sample_id=torch.arange(b),
                      head_ids=head_ids, head_logprobs=head_lp, tnorm=torch.logsumexp(t_lp / T, -1),
                      tail_ids=torch.zeros(b, length, 0, dtype=torch.long), tail_logprobs=torch.zeros(b, length, 0),
                      tail_counts=torch.zeros(b, length, 0), tail_logq=torch.zeros(b, length, 0),
                      aligned=torch.rand(b, length, generator=g) > 0.3, temperature=T)
        plan = TargetPlan(top_k=k, temperature=T, grid_index=0, tail="bucket", draws=0, rel_error=2.0 ** -11)
        results = []
        for fused, chunk in ((False, 0), (True, 0), (True, 7)):
            for mode in ("train", "eval"):
                student.zero_grad()
                net = Distiller(student, plan, weights={"kd": 1.0, "ce": 0.5}, loss_chunk=chunk, fused=fused,
                                cross="match").train(mode == "train")
                losses, top1, n = net(batch)
                if mode == "train":
                    (losses["kd"] + 0.5 * losses["ce"]).backward()
                    grads = [p.grad.clone() for p in student.parameters()]
                else:
                    results.append((losses["kd"].detach(), losses["ce"].detach(), int(top1), grads))
        kd0, ce0, t0, g0 = results[0]
        assert kd0 > 0 and torch.isfinite(kd0)
        for kd, ce, t, gr in results[1:]:
            torch.testing.assert_close(kd, kd0, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ce, ce0, rtol=1e-5, atol=1e-6)
            assert t == t0
            for a, c in zip(gr, g0):
                torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_cross_tokenizer_reads_no_sampled_tail(workdir, llama_teacher, corpus):
    """The sampled tail's ids are the teacher's: a cross-tokenizer run plans the bucket on a cache with draws,
    so --tail auto and a --top-k below the head raise none of the sampled tail's refusals."""
    from pikv_offline.cache.reader import open_cache
    from pikv_offline.config import DumpConfig
    from pikv_offline.student import data as D
    from pikv_offline.teacher.dump import run as dump

    path = workdir / "xtok-sampled"
    if not path.exists():
        dump(DumpConfig(teacher=llama_teacher, data=corpus, out=str(path), seq_len=32, top_k=8, sampled_tail=4,
                        temperatures=(1.0, 2.0), shard_seqs=4, max_sequences=8))
    cache = open_cache(str(path))
    assert D.plan_targets(cache, None, 1.0, "auto").tail == "sampled"
    plan = D.plan_targets(cache, 4, 1.0, "auto", cross=True)
    assert (plan.tail, plan.top_k, plan.draws) == ("bucket", 4, 4)
