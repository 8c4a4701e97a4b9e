"""Cross-tokenizer pieces: exact token bytes, the student's tokens of the teacher's text and the positions
where both predict after the same text, and the ULD loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pikv_offline.student.xtok import retokenize, token_bytes, uld_rows


def _sentencepiece_style(texts, vocab_size=300):
    """A Llama-2-like tokenizer: BPE over pieces with '▁' for spaces and byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "</s>", "<pad>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 259, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    return fast


@pytest.fixture(scope="module")
def tokenizers(texts, tokenizer):
    from pikv_offline.tools.toy import train_tokenizer

    return {"bpe512": tokenizer, "bpe300": train_tokenizer(texts[:200], vocab_size=300),
            "spiece": _sentencepiece_style(texts[:200])}


SAMPLES = ["Return the sum of a and b.\n\n    Raises ValueError if é ≠ 0 — naïve 🙂 case.", "  two  spaces\tand tabs\n"]


@pytest.mark.parametrize("name", ["bpe512", "bpe300", "spiece"])
def test_token_bytes_rebuild_the_text_exactly(tokenizers, texts, name):
    tok = tokenizers[name]
    table = token_bytes(tok)
    assert table[tok.eos_token_id] is None
    for text in SAMPLES + texts[:20]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")


@pytest.mark.parametrize("teacher,student", [("bpe512", "bpe300"), ("bpe512", "spiece"), ("spiece", "bpe512"),
                                             ("bpe512", "bpe512")])
def test_retokenized_sequence_holds_the_same_text_and_aligned_positions_share_their_prefix(tokenizers, texts,
                                                                                            teacher, student):
    t_tok, s_tok = tokenizers[teacher], tokenizers[student]
    t_table, s_table = token_bytes(t_tok), token_bytes(s_tok)
    eos = t_tok.eos_token_id
    docs = SAMPLES + texts[:6]
    stream = [i for d in docs for i in t_tok(d, add_special_tokens=False)["input_ids"] + [eos]]
    L = 96
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
        for t in aligned:  # student token t+1 and teacher token u+1 start after the same text
            u = pos[t]
            s_prefix, t_prefix = text_of(s_table, ids, t + 1), text_of(t_table, t_ids, u + 1)
            assert s_prefix.endswith(t_prefix[-40:]) or t_prefix.endswith(s_prefix[-40:])
            assert len(s_prefix.split(b"\x00EOS\x00")[-1]) <= len(t_prefix.split(b"\x00EOS\x00")[-1])
            assert s_prefix.split(b"\x00EOS\x00")[-1] == t_prefix.split(b"\x00EOS\x00")[-1][
                len(t_prefix.split(b"\x00EOS\x00")[-1]) - len(s_prefix.split(b"\x00EOS\x00")[-1]):]
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
    # the same run in the worker process reads the same batches (the tokenizers load there)
    r2 = run(TrainConfig(out=str(tmp_path / "run-worker"), **{**kw, "num_workers": 1, "max_steps": 2}))
    first = [json.loads(x) for x in open(tmp_path / "run-worker" / "metrics.jsonl")][0]
    assert first["kd"] == pytest.approx(steps[0]["kd"], rel=1e-5) and r2["steps"] == 2
    # what cannot work is refused in one line
    small = tmp_path / "small.json"
    small.write_text(cfg_path.read_text().replace(f'"vocab_size": {n_tok}', '"vocab_size": 100'))
    base = ["train-student", "--cache", trained_cache, "--max-steps", "1", "--num-workers", "0"]
    for args, msg in ((["--student-config", str(small), "--student-tokenizer", str(tok_dir)], "only 100"),
                      (["--student-config", str(cfg_path), "--student-tokenizer", str(tmp_path / "none")], "not a folder"),
                      (["--student-config", str(cfg_path), "--student-tokenizer", str(tok_dir), "--hidden-weight", "1"],
                       "")):
        p = pikv_subprocess(base + args + ["--out", str(tmp_path / f"bad-{len(msg)}-{len(args)}")], timeout=120)
        assert p.returncode == 2 and msg in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr, \
            p.stderr[-1500:]
