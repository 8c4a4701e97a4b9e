"""LoRA students (--lora-rank): only adapters train, the base stays, merged == base + adapter, resume and
2 ranks are equivalences, and bad flags or checkpoints are one clear line."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import pikv_subprocess
from pikv_offline.errors import PikvError
from test_train import assert_weights_close, train

LORA = dict(lora_rank=4, lora_targets="q_proj,v_proj,down_proj", ce_weight=0.3)


@pytest.fixture(scope="module")
def base_student(workdir, student_config):
    """A saved student (the frozen base): a fresh model from the tests' student config."""
    from transformers import AutoConfig

    path = workdir / "lora-base"
    if not path.exists():
        torch.manual_seed(5)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.load(open(student_config)))).save_pretrained(path)
    return str(path)


def lora_train(cache, student, out, **kw):
    kw = {**LORA, **kw}
    return train(cache, kw.pop("student_config", None), out, student=student, **kw)


def test_only_adapters_train_and_merged_is_base_plus_adapter(train_cache, base_student, tmp_path):
    from peft import PeftModel

    out = tmp_path / "r"
    lora_train(train_cache, base_student, out, max_steps=4)
    base = AutoModelForCausalLM.from_pretrained(base_student)
    cfg = base.config
    hidden, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = 4 * (hidden + hidden) + 4 * (hidden + kv) + 4 * (cfg.intermediate_size + hidden)  # q, v, down
    metrics_line = [json.loads(x) for x in open(out / "metrics.jsonl")][0]
    assert metrics_line["step"] == 1
    ckpt = out / "checkpoint-4"
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert sum(v.numel() for v in adapter.values()) == per_layer * cfg.num_hidden_layers
    assert not (ckpt / "model.safetensors").exists(), "a checkpoint holds the adapter, not the student"
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "the adapter trained"

    merged = AutoModelForCausalLM.from_pretrained(out / "final")  # plain transformers, no peft
    assert not (out / "final" / "adapter_config.json").exists()
    b, m = base.state_dict(), merged.state_dict()
    targeted = [k for k in b if any(f".{t}." in k for t in ("q_proj", "v_proj", "down_proj"))]
    assert targeted and all(not torch.equal(b[k], m[k]) for k in targeted)
    for k in set(b) - set(targeted):  # everything without an adapter is the frozen base, bit for bit
        assert torch.equal(b[k], m[k]), k

    with_adapter = PeftModel.from_pretrained(base, out / "final" / "adapter")
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(x).logits, merged(x).logits, rtol=1e-5, atol=1e-5)


def test_resumed_equals_uninterrupted_and_two_ranks_equal_one(train_cache, base_student, tmp_path):
    lora_train(train_cache, base_student, tmp_path / "full", max_steps=6)
    part = tmp_path / "part"
    lora_train(train_cache, base_student, part, max_steps=6, save_every=3)
    for name in ("final", "checkpoint-6"):  # as if killed after checkpoint-3
        shutil.rmtree(part / name)
    res = lora_train(train_cache, base_student, part, max_steps=6, save_every=3, resume=True)
    assert res["steps"] == 6
    final = lambda run: load_file(os.path.join(run, "final", "model.safetensors"))  # noqa: E731
    assert_weights_close(final(tmp_path / "full"), final(part), exact=True)

    p = pikv_subprocess(["train-student", "--cache", train_cache, "--student", base_student, "--out",
                         str(tmp_path / "two"), "--max-steps", "6", "--batch-size", "2", "--lr", "3e-3",
                         "--eval-fraction", "0.1", "--num-workers", "0", "--warmup-steps", "1", "--ce-weight", "0.3",
                         "--lora-rank", "4", "--lora-targets", "q_proj,v_proj,down_proj"], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_weights_close(final(tmp_path / "full"), final(tmp_path / "two"))


def test_bad_lora_flags_and_mismatched_resumes_are_refused(train_cache, base_student, student_config, corpus,
                                                           tmp_path):
    from pikv_offline.config import TrainConfig

    base = dict(cache=train_cache, student=base_student, out=str(tmp_path / "x"), max_steps=2)
    for kw, words in ((dict(lora_rank=-1), "--lora-rank must be >= 0"),
                      (dict(lora_alpha=4.0), "need --lora-rank"),
                      (dict(lora_rank=4, lora_alpha=float("nan")), "--lora-alpha must be a positive"),
                      (dict(lora_rank=4, freeze=("mlp",)), "--freeze with --lora-rank"),
                      (dict(lora_rank=4, lora_targets=" , "), "--lora-targets is empty")):
        with pytest.raises(PikvError, match=words):
            TrainConfig(**base, **kw)
    with pytest.raises(PikvError, match="no module named 'qkv'"):
        lora_train(train_cache, base_student, tmp_path / "t", lora_targets="qkv")

    run = tmp_path / "r"
    lora_train(train_cache, base_student, run, max_steps=2)
    with pytest.raises(PikvError, match="holds a LoRA adapter"):  # resuming without --lora-rank
        train(train_cache, None, run, student=base_student, max_steps=4, resume=True, ce_weight=0.3)
    for kw in (dict(lora_rank=8), dict(lora_alpha=2.0), dict(lora_targets="q_proj")):
        with pytest.raises(PikvError, match="was trained with --lora-rank/--lora-alpha/--lora-targets"):
            lora_train(train_cache, base_student, run, max_steps=4, resume=True, **kw)
    weights_file = run / "checkpoint-2" / "adapter_model.safetensors"
    good = weights_file.read_bytes()
    from safetensors.torch import save_file
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in load_file(weights_file).items()},
              str(weights_file))
    with pytest.raises(PikvError, match="does not match this run's --lora-rank"):  # a hand-made adapter file
        lora_train(train_cache, base_student, run, max_steps=4, resume=True)
    weights_file.write_bytes(good)
    with pytest.raises(PikvError, match="another base student"):  # the same config, other weights
        lora_train(train_cache, None, run, max_steps=4, resume=True, student_config=student_config)
    (run / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(PikvError, match="not a readable adapter"):
        lora_train(train_cache, base_student, run, max_steps=4, resume=True)
    weights_file.write_bytes(good)
    stored = load_file(weights_file)
    save_file({k: v.half() for k, v in stored.items()}, str(weights_file))
    with pytest.raises(PikvError, match="not float32"):
        lora_train(train_cache, base_student, run, max_steps=4, resume=True)
    for name in ("checkpoint-2", "final"):  # an adapter folder is not a model: its stored base path is not followed
        if name == "final":
            name = "final/adapter"
        with pytest.raises(PikvError, match="holds a LoRA adapter"):
            train(train_cache, None, tmp_path / "s", student=str(run / name), max_steps=1)
    from pikv_offline.config import DumpConfig
    from pikv_offline.teacher.dump import run as dump
    with pytest.raises(PikvError, match="--teacher .* holds a LoRA adapter"):
        dump(DumpConfig(teacher=str(run / "checkpoint-2"), data=corpus, out=str(tmp_path / "d"), seq_len=32,
                        max_sequences=4))
    assert not (tmp_path / "d").exists()
    save_file({k: v * 1e30 for k, v in stored.items()}, str(weights_file))  # finite, but every step overflows
    shutil.rmtree(run / "final")
    with pytest.raises(PikvError, match="steps in a row"):
        lora_train(train_cache, base_student, run, max_steps=4, resume=True)
    assert not (run / "final").exists()
    weights_file.write_bytes(good)
    with pytest.raises(PikvError, match="ties its LM head"):
        lora_train(train_cache, base_student, tmp_path / "tied", lora_targets="lm_head")
    with pytest.raises(PikvError, match="ties its LM head"):
        lora_train(train_cache, base_student, tmp_path / "tied", lora_targets="embed_tokens,q_proj")
    with pytest.raises(PikvError, match="above the widths"):
        lora_train(train_cache, base_student, tmp_path / "huge", lora_rank=2 ** 40)
    # the same settings spelled otherwise (alpha = its default 2 x rank, targets in another order) resume
    r = lora_train(train_cache, base_student, run, max_steps=3, resume=True, lora_alpha=8.0,
                   lora_targets="down_proj,q_proj,v_proj")
    assert r["steps"] == 3

    full = tmp_path / "f"
    train(train_cache, None, full, student=base_student, max_steps=2)
    with pytest.raises(PikvError, match="holds a whole student"):
        lora_train(train_cache, base_student, full, max_steps=4, resume=True)


def test_an_adapter_on_an_untied_head_checkpoints_the_adapter_alone(train_cache, student_config, workdir, tmp_path):
    """peft would save the whole base LM head beside an adapter on it; a resume would then take base weights
    from the checkpoint. The checkpoint holds the adapter alone, and a file with a base weight is refused."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoConfig

    base = workdir / "lora-untied"
    if not base.exists():
        torch.manual_seed(6)
        conf = {**json.load(open(student_config)), "tie_word_embeddings": False}
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**conf)).save_pretrained(base)
    run = tmp_path / "u"
    lora_train(train_cache, str(base), run, max_steps=2, lora_targets="lm_head,q_proj", save_every=1)
    stored = load_file(run / "checkpoint-1" / "adapter_model.safetensors")
    assert stored and all("lora_" in k for k in stored), sorted(stored)
    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "final" / "adapter")
    x = torch.randint(0, merged.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(x).logits, merged(x).logits, rtol=1e-5, atol=1e-5)
    head = AutoModelForCausalLM.from_pretrained(base).lm_head.weight
    save_file({**stored, "base_model.model.lm_head.base_layer.weight": torch.zeros_like(head)},
              str(run / "checkpoint-1" / "adapter_model.safetensors"))
    shutil.rmtree(run / "checkpoint-2")
    with pytest.raises(PikvError, match="does not match this run's --lora-rank"):
        lora_train(train_cache, str(base), run, max_steps=2, lora_targets="lm_head,q_proj", resume=True)
