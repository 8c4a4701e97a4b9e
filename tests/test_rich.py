"""Rich targets (hidden states, KV cache, MoE router logits and expert outputs), end to end.

Stored targets equal a live forward through transformers' own outputs; encodings meet their
measured bounds; each loss is zero at identity and descends; a 2-rank run with every loss on moves
each loss down; make-student copies layers exactly; --freeze freezes; resume stays exact.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import CONTEXT, pikv_subprocess
from pikv_offline.cache import format as F
from pikv_offline.cache.reader import describe, open_cache
from pikv_offline.config import DumpConfig, TrainConfig, parse_targets
from pikv_offline.errors import PikvError
from pikv_offline.student import data as D
from pikv_offline.student.losses import feature_loss, router_loss
from pikv_offline.tools.make_student import make

MOE = dict(model_type="qwen2_moe", hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
           num_experts_per_tok=2, mlp_only_layers=[1], max_position_embeddings=CONTEXT, tie_word_embeddings=False,
           bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="session")
def moe_teacher(workdir, tokenizer):
    """A tiny Qwen2-MoE: layers 0 and 2 are MoE (4 experts), layer 1 is dense."""
    path = workdir / "teacher-moe"
    if not path.exists():
        torch.manual_seed(3)
        spec = {k: v for k, v in MOE.items() if k != "model_type"}
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2_moe", vocab_size=len(tokenizer), **spec))
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


RICH_ARGS = ["--targets", "hidden:0,-1@fp16", "--targets", "kv:1@int8", "--targets", "router@fp16",
             "--targets", "experts@int8"]


@pytest.fixture(scope="session")
def rich_cache(workdir, moe_teacher, corpus):
    """Every rich target of the MoE teacher, dumped by 2 ranks: 48 sequences of 32 tokens."""
    out = workdir / "rich-cache"
    r = pikv_subprocess(["dump-teacher", "--teacher", moe_teacher, "--data", corpus, "--out", str(out), "--seq-len", "32",
                         "--max-sequences", "48", "--top-k", "16", "--shard-size", "8", "--batch-size", "8", *RICH_ARGS],
                        nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out)


def _live(teacher_dir, x):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    experts = {}
    hooks = [model.model.layers[i].mlp.register_forward_hook(lambda m, a, o, i=i: experts.__setitem__(i, o))
             for i in (0, 2)]
    with torch.no_grad():
        out = model(input_ids=x, use_cache=True, output_hidden_states=True, output_router_logits=True)
    for h in hooks:
        h.remove()
    return model, out, experts


def test_tensor_encodings_meet_their_bounds():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 128)).astype(np.float32) * np.array([1e-4, 1.0, 300.0], np.float32)[:, None, None]
    x[0, 0, 7] = 4000.0  # an outlier channel, as in large models' hidden states
    x[1, 1] = 0.0  # an all-zero token
    bounds = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8, "int8": 1 / 254}
    for enc, bound in bounds.items():
        group = F.int8_group(128) if enc == "int8" else 128
        values, scale = F.encode_tensor(x, enc, group)
        back = F.decode_tensor(values, scale, enc, group)
        e = F.error_summary(F.encoding_error(x, back, group))
        assert e["max_error_over_absmax"] <= bound * (1 + 1e-5), (enc, e)
        assert e["max_error_over_absmax"] > bound / 4, "the bound is tight, so the measurement is real"
        assert (back[1, 1] == 0).all()
    # int8's groups keep the outlier's damage inside its own 64 channels
    values, scale = F.encode_tensor(x, "int8", 64)
    back = F.decode_tensor(values, scale, "int8", 64)
    assert np.abs(back[0, 0, 64:] - x[0, 0, 64:]).max() <= np.abs(x[0, 0, 64:]).max() / 254 * 1.0001


def test_targets_parse_and_refuse():
    assert parse_targets(["hidden:4,8@int8", "router"]) == (("hidden", (4, 8), "int8"), ("router", None, "bf16"))
    for bad, msg in [("router@int8", "int8 is for"), ("weights:1", "kind must be"), ("hidden:a", "integers"),
                     ("hidden:1,1", "once"), ("kv:1@fp8", "encoding must")]:
        with pytest.raises(PikvError, match=msg):
            parse_targets([bad])
    with pytest.raises(PikvError, match="twice"):
        parse_targets(["hidden:1", "hidden:2"])


def test_stored_targets_equal_live_forward(rich_cache, moe_teacher):
    cache = open_cache(rich_cache)
    t = cache.attrs.targets
    assert t["hidden"]["layers"] == [0, 2] and t["router"]["layers"] == [0, 2] and t["experts"]["layers"] == [0, 2]
    assert t["kv"]["shape"] == [2, 12] and t["router"]["shape"] == [4]
    a = cache.read_all()
    x = torch.from_numpy(a[F.INPUT_IDS].astype(np.int64))
    model, out, experts = _live(moe_teacher, x)
    hs = out.hidden_states
    # hidden: layer 0 is hidden_states[1]; the last layer's output, normed, is the model's last hidden state
    np.testing.assert_allclose(a["hidden/layer_0"], hs[1].numpy(), rtol=2 ** -10, atol=1e-6)
    with torch.no_grad():
        normed = model.model.norm(torch.from_numpy(a["hidden/layer_2"]))
    torch.testing.assert_close(normed, hs[-1], rtol=2e-3, atol=2e-3)
    # router logits: transformers' own output_router_logits, one entry per MoE layer in order
    for layer, live in zip((0, 2), out.router_logits):
        np.testing.assert_allclose(a[f"router/layer_{layer}"].reshape(live.shape), live.numpy(), rtol=2 ** -10, atol=1e-6)
    # kv: the model's own cache; int8 error within absmax/254 per token and head
    for part in ("key", "value"):
        cached = out.past_key_values.layers[1]
        live = (cached.keys if part == "key" else cached.values).transpose(1, 2).numpy()
        err = np.abs(a[f"kv/layer_1/{part}"] - live)
        assert (err <= np.abs(live).max(-1, keepdims=True) / 254 * 1.001 + 1e-12).all()
    for layer in (0, 2):  # experts: the MoE block output, int8 in groups of 16 channels
        live = experts[layer].numpy()
        g = lambda v: v.reshape(*v.shape[:-1], 3, 16)  # noqa: E731
        assert (g(np.abs(a[f"experts/layer_{layer}"] - live)) <= g(np.abs(live)).max(-1, keepdims=True) / 254 * 1.001
                + 1e-12).all()
    info = describe(rich_cache)
    by = info["bytes_per_token_by_target"]
    assert {"inputs", "logits", "hidden:0", "hidden:2", "kv:1", "router:0", "router:2", "experts:0"} <= set(by)
    assert by["hidden:0"] > by["router:0"] > 0
    errs = info["encoding_errors"]
    assert 0 < errs["kv/layer_1/key"]["max_error_over_absmax"] <= 1 / 254 * 1.0001
    assert 0 < errs["router/layer_0"]["max_error_over_absmax"] <= 2.0 ** -11 * 1.0001
    r = pikv_subprocess(["verify", rich_cache, "--recompute", "6", "--teacher", moe_teacher, "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)["recompute"]["rich"]
    assert {x["array"] for x in rows} == {a.name for a in cache.rich}
    for x in rows:
        assert 0 < x["max_error_over_absmax"] <= x["bound"] * 1.01, x
    r = pikv_subprocess(["inspect", rich_cache])
    assert "kv:1" in r.stdout and "max error / absmax" in r.stdout


def test_dense_teacher_targets(llama_teacher, corpus, tmp_path):
    from pikv_offline.teacher.dump import run

    out = tmp_path / "dense"
    run(DumpConfig(sampled_tail=0, encoding="fp16", teacher=llama_teacher, data=corpus, out=str(out), seq_len=32, max_sequences=8, top_k=8,
                   shard_seqs=8, targets=parse_targets(["hidden:1@bf16", "kv:0@fp16"])))
    a = open_cache(str(out)).read_all()
    model = AutoModelForCausalLM.from_pretrained(llama_teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        o = model(input_ids=torch.from_numpy(a[F.INPUT_IDS].astype(np.int64)), use_cache=True)
    live = o.past_key_values.layers[0].keys.transpose(1, 2).numpy()
    np.testing.assert_allclose(a["kv/layer_0/key"], live, rtol=2 ** -10, atol=1e-7)
    with torch.no_grad():
        normed = model.model.norm(torch.from_numpy(a["hidden/layer_1"]))
        last = model.model(input_ids=torch.from_numpy(a[F.INPUT_IDS].astype(np.int64))).last_hidden_state
    torch.testing.assert_close(normed, last, rtol=1e-2, atol=1e-2)  # bf16: 2^-8 relative
    for targets, msg in [(["router"], "is dense, it has no MoE router"), (["experts:0"], "is dense"),
                         (["hidden:5"], "out of range; the teacher has 2 layers")]:
        with pytest.raises(PikvError, match=msg):
            run(DumpConfig(sampled_tail=0, encoding="fp16", teacher=llama_teacher, data=corpus, out=str(tmp_path / "bad"), seq_len=32, max_sequences=8,
                           targets=parse_targets(targets)))
        assert not (tmp_path / "bad").exists(), "a refused request leaves nothing behind"


def test_moe_layer_checks_and_size_refusal(moe_teacher, corpus, tmp_path):
    from pikv_offline.teacher.dump import run

    with pytest.raises(PikvError, match="layer 1 of the teacher is not a MoE layer; its MoE layers are \\[0, 2\\]"):
        run(DumpConfig(sampled_tail=0, encoding="fp16", teacher=moe_teacher, data=corpus, out=str(tmp_path / "x"), seq_len=32, max_sequences=8,
                       targets=parse_targets(["experts:1"])))
    out = tmp_path / "big"
    r = pikv_subprocess(["dump-teacher", "--teacher", moe_teacher, "--data", corpus, "--out", str(out), "--seq-len", "32",
                         "--max-sequences", "64", "--targets", "hidden", "--max-cache-gb", "0.0001"])
    assert r.returncode == 2 and not out.exists()
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the cache would take about") and "--max-cache-gb 0.0001" in line, r.stderr
    assert "hidden" in line and "B/token" in line


def test_losses_zero_at_identity_and_descend():
    torch.manual_seed(0)
    t = torch.randn(10, 2, 8)
    for kind in ("mse", "cosine"):
        loss, n = feature_loss(t.clone(), t, kind)
        assert n == 10 and abs(loss.item()) < 1e-5
        s = (t + 0.5 * torch.randn_like(t)).requires_grad_()
        loss, _ = feature_loss(s, t, kind)
        loss.backward()
        if kind == "mse":  # the gradient points from the teacher to the student
            assert ((s.grad * (s - t)).detach() >= 0).all()
        with torch.no_grad():
            assert feature_loss(s - 0.1 * s.grad, t, kind)[0] < loss
    logits = torch.randn(10, 4)
    assert abs(router_loss(logits.clone(), logits)[0].item()) < 1e-6
    s = torch.randn(10, 4, requires_grad=True)
    loss, n = router_loss(s, logits)
    loss.backward()
    assert n == 10 and loss > 0
    # d KL / d s = softmax(s) - softmax(t): positive exactly where the student over-weights an expert
    torch.testing.assert_close(s.grad, torch.softmax(s, -1).detach() - torch.softmax(logits, -1))
    with torch.no_grad():
        assert router_loss(s - 0.5 * s.grad, logits)[0] < loss


def test_make_student_copies_layers(moe_teacher, llama_teacher):
    x = torch.randint(0, 500, (2, 16))
    for path in (moe_teacher, llama_teacher):
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        n = teacher.config.num_hidden_layers
        same = make(teacher, list(range(n))).eval()
        with torch.no_grad():
            torch.testing.assert_close(same(x, use_cache=False).logits, teacher(x, use_cache=False).logits, rtol=0, atol=0)
    teacher = AutoModelForCausalLM.from_pretrained(moe_teacher, dtype=torch.float32).eval()
    student = make(teacher, [1, 2]).eval()  # a dense layer then a MoE layer
    assert student.config.mlp_only_layers == [0] and student.config.num_hidden_layers == 2
    with torch.no_grad():
        want_logits = student(x, use_cache=False).logits
        teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[1], teacher.model.layers[2]])
        teacher.config.num_hidden_layers = 2
        torch.testing.assert_close(want_logits, teacher(x, use_cache=False).logits, rtol=1e-6, atol=1e-6)


def test_make_student_cli(moe_teacher, tmp_path):
    out = tmp_path / "s"
    r = pikv_subprocess(["make-student", "--teacher", moe_teacher, "--keep-layers", "0,-1", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(out / "config.json"))["num_hidden_layers"] == 2 and (out / "tokenizer.json").exists()
    r = pikv_subprocess(["make-student", "--teacher", moe_teacher, "--keep-layers", "2,0", "--out", str(tmp_path / "t")])
    assert r.returncode == 2 and "increasing order" in r.stderr and not (tmp_path / "t").exists()


def test_identity_student_has_zero_rich_losses(rich_cache, moe_teacher):
    """A student that is the teacher, with identity projections: every rich loss is at the encoding's noise."""
    from pikv_offline.student.distiller import Distiller, resolve_pairs

    cache = open_cache(rich_cache)
    teacher = AutoModelForCausalLM.from_pretrained(moe_teacher, dtype=torch.float32)
    student = make(teacher, [0, 1, 2])
    pairs = resolve_pairs(cache, student, {"hidden": 1, "kv": 1, "router": 1, "experts": 1}, None)
    assert {(p.kind, p.t, p.s) for p in pairs} >= {("hidden", 2, 2), ("kv", 1, 1), ("router", 0, 0), ("experts", 2, 2)}
    plan = D.plan_targets(cache, None, 1.0, "bucket", rich=tuple(cache.rich))
    net = Distiller(student, plan, weights={"kd": 1.0, "ce": 1.0}, pairs=pairs, targets=cache.attrs.targets)
    b = D.to_batch(D.read_rows(cache, D.CacheIndex(cache, 0.0).train[:8], cache.logit_names + D.rich_names(plan.rich)),
                   cache.encoding, plan)
    with torch.no_grad():
        losses, _, n = net(b)
        # each loss against the same loss with a zero student: the targets' own energy, layers averaged
        ref = {k: np.mean([float(feature_loss(b.rich[f"{k}/layer_{i}"].reshape(-1, 1, 48), torch.zeros(1, 1, 48))[0])
                           for i in (0, 2)]) for k in ("hidden", "experts")}
    assert losses["hidden"] / ref["hidden"] < 1e-5 and losses["experts"] / ref["experts"] < 1e-4
    assert losses["router"] / n < 1e-6 and losses["kd"] / n < 1e-5
    assert losses["kv"] / n < 1e-4


def _student_config(tmp_path, tokenizer, **over):
    spec = dict(MOE, vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                moe_intermediate_size=16, shared_expert_intermediate_size=16, mlp_only_layers=[],
                tie_word_embeddings=True)
    spec.update(over)
    path = tmp_path / "moe-student.json"
    path.write_text(json.dumps(spec))
    return str(path)


# Cosine keeps every feature loss O(1): the random teacher's expert outputs are ~1e-2, so their MSE
# (~1e-6) would carry no weight next to the others.
ALL_LOSSES = ["--kd-weight", "1", "--hidden-weight", "1", "--kv-weight", "1", "--router-weight", "1",
              "--experts-weight", "1", "--feature-loss", "cosine"]


def test_two_ranks_every_loss_moves_down(rich_cache, tokenizer, tmp_path):
    out = tmp_path / "run"
    r = pikv_subprocess(["train-student", "--cache", rich_cache, "--student-config", _student_config(tmp_path, tokenizer),
                         "--out", str(out), "--max-steps", "30", "--batch-size", "4", "--lr", "3e-3", "--log-every", "1",
                         "--eval-fraction", "0.1", "--num-workers", "0", *ALL_LOSSES], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(x) for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert len(steps) == 30
    for k in ("kd", "hidden", "kv", "router", "experts"):
        first, last = np.mean([s[k] for s in steps[:3]]), np.mean([s[k] for s in steps[-3:]])
        assert last < first * 0.95, (k, first, last)
    state = torch.load(out / "checkpoint-30" / "trainer_state.pt", weights_only=False)
    assert {"hidden_0_0.weight", "hidden_2_1.weight", "kv_1_0_key.weight", "experts_2_1.weight"} <= set(state["projections"])
    assert state["projections"]["hidden_0_0.weight"].shape == (48, 32)
    from safetensors.torch import load_file

    keys = load_file(out / "final" / "model.safetensors")
    assert all(k.startswith(("model.", "lm_head.")) for k in keys), "final/ is the student alone, no projection"


def test_rich_resume_equals_uninterrupted_and_freeze(rich_cache, tokenizer, tmp_path):
    from pikv_offline.student.train import run

    def train(out, **kw):
        return run(TrainConfig(cache=rich_cache, student_config=_student_config(tmp_path, tokenizer), out=str(out),
                               max_steps=4, batch_size=4, lr=3e-3, eval_fraction=0.1, num_workers=0, hidden_weight=1,
                               kv_weight=1, router_weight=0.5, experts_weight=1, feature_loss="mse",
                               layer_map="0:0,1:1,2:1", freeze=("embeddings", "layers:0"), **kw))

    train(tmp_path / "full")
    part = tmp_path / "part"
    train(part, save_every=2)
    for name in ("final", "checkpoint-4"):
        shutil.rmtree(part / name)
    train(part, save_every=2, resume=True)
    a = torch.load(tmp_path / "full" / "checkpoint-4" / "trainer_state.pt", weights_only=False)["projections"]
    b = torch.load(part / "checkpoint-4" / "trainer_state.pt", weights_only=False)["projections"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "full" / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # frozen: the embeddings (tied head) and layer 0 are the initial weights; layer 1 moved
    torch.manual_seed(0)
    init = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.load(open(_student_config(tmp_path, tokenizer)))))
    init = init.state_dict()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final").state_dict()
    layer0 = [k for k in final if k.startswith("model.layers.0.")]
    assert torch.equal(final["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    assert len(layer0) > 5 and all(torch.equal(final[k], init[k]) for k in layer0)
    assert not torch.equal(final["model.layers.1.self_attn.q_proj.weight"], init["model.layers.1.self_attn.q_proj.weight"])


def test_rich_training_refusals(rich_cache, train_cache, student_config, tokenizer, tmp_path):
    from pikv_offline.student.train import run

    base = dict(out=str(tmp_path / "r"), max_steps=1, batch_size=4, eval_fraction=0.1, num_workers=0)
    cases = [
        (dict(cache=rich_cache, student_config=student_config, router_weight=1), "the student \\(llama\\) is dense"),
        (dict(cache=train_cache, student_config=student_config, hidden_weight=1), "the cache holds no hidden targets"),
        (dict(cache=rich_cache, student_config=student_config, hidden_weight=1, layer_map="0:5"),
         "the student 0..0"),
        (dict(cache=rich_cache, student_config=student_config, hidden_weight=1, layer_map="1:0"),
         "none of the cache's hidden layers"),
        (dict(cache=rich_cache, student_config=_student_config(tmp_path, tokenizer, num_experts=8), router_weight=1),
         "8 experts, the teacher's 4"),
        (dict(cache=rich_cache, student_config=student_config, ce_weight=1, freeze=("layers:3",)), "not 3"),
    ]
    for kw, msg in cases:
        with pytest.raises(PikvError, match=msg):
            run(TrainConfig(**base, **kw))
    with pytest.raises(PikvError, match="--freeze"):
        TrainConfig(**base, cache=rich_cache, student_config=student_config, freeze=("attention",))
    with pytest.raises(PikvError, match="--layer-map"):
        TrainConfig(**base, cache=rich_cache, student_config=student_config, layer_map="1-2")
    assert not os.path.exists(tmp_path / "r" / "final"), "a refused run leaves no student behind"


def test_default_size_limit_is_the_free_disk(moe_teacher, corpus, tmp_path, monkeypatch):
    import collections

    from pikv_offline.teacher import dump

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(dump.shutil, "disk_usage", lambda path: usage(10**6, 0, 50_000))
    with pytest.raises(PikvError, match="more than the 0.00 GB free at --out"):
        dump.run(DumpConfig(sampled_tail=0, encoding="fp16", teacher=moe_teacher, data=corpus, out=str(tmp_path / "deep" / "c"), seq_len=32,
                            max_sequences=16, targets=parse_targets(["hidden"])))
    assert not (tmp_path / "deep").exists()


def test_sliding_window_kv_is_refused_before_writing(tokenizer, corpus, tmp_path):
    from pikv_offline.teacher.dump import run

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mistral", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, sliding_window=8, max_position_embeddings=CONTEXT,
        bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    with pytest.raises(PikvError, match="caches 7 of 32 positions \\(a sliding window\\)"):
        run(DumpConfig(sampled_tail=0, encoding="fp16", teacher=str(tmp_path / "mistral"), data=corpus, out=str(tmp_path / "c"), seq_len=32,
                       max_sequences=8, targets=parse_targets(["kv:1"])))
    assert not (tmp_path / "c" / "units").exists(), "no unit was written"


@pytest.mark.parametrize("kind, extra", [
    ("gpt2", dict(n_embd=32, n_layer=3, n_head=4)),
    ("mixtral", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    ("olmoe", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, num_experts=4, num_experts_per_tok=2)),
])
def test_capture_matches_transformers_outputs(kind, extra):
    """Capture on other families: hidden states, the model's cache and output_router_logits agree."""
    from pikv_offline.modeling import Capture, moe_layers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, vocab_size=64, bos_token_id=0,
                                                                  eos_token_id=0, **extra)).eval()
    moe = sorted(moe_layers(model))
    assert moe == ([] if kind == "gpt2" else [0, 1, 2])
    cap = Capture(model, {"hidden": (0,), "kv": (1,), "router": tuple(moe), "experts": tuple(moe) or (1,)})
    # The MoE/MLP block of layer 1 adds its output to the residual stream entering its norm, so that
    # output is HF's hidden state after layer 1 minus that residual (recorded here by a hook of our own).
    block = model.base_model.h[1] if kind == "gpt2" else model.base_model.layers[1]
    norm = block.ln_2 if kind == "gpt2" else block.post_attention_layernorm
    residual = {}
    norm.register_forward_pre_hook(lambda _m, args: residual.__setitem__("mid", args[0].detach().clone()))
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        model.base_model(input_ids=x, **cap.forward_kwargs())
        got = cap.collect(2, 9)
        ref = model(input_ids=x, use_cache=True, output_hidden_states=True, output_router_logits=bool(moe))
    torch.testing.assert_close(got[("hidden", 0)], ref.hidden_states[1])
    torch.testing.assert_close(got[("kv", 1, "key")], ref.past_key_values.layers[1].keys.transpose(1, 2))
    for layer, live in zip(moe, ref.router_logits if moe else ()):
        torch.testing.assert_close(got[("router", layer)].reshape(live.shape), live)
    torch.testing.assert_close(got[("experts", 1)], ref.hidden_states[2] - residual["mid"], atol=1e-5, rtol=1e-4)


def test_rich_grad_accumulation_2_equals_1(rich_cache, student_config, tmp_path):
    """Rich losses are sums normalized once per step: accumulating 2 micro-batches equals one batch of 8
    (a dense student: its MLP matches the expert outputs)."""
    from safetensors.torch import load_file

    from pikv_offline.student.train import run

    for name, bs, accum in (("a", 8, 1), ("b", 4, 2)):
        run(TrainConfig(cache=rich_cache, student_config=student_config, out=str(tmp_path / name), max_steps=3,
                        batch_size=bs, grad_accum=accum, lr=3e-3, eval_fraction=0.1, num_workers=0, ce_weight=0.5,
                        hidden_weight=1, kv_weight=1, experts_weight=1))
    wa, wb = (load_file(tmp_path / n / "final" / "model.safetensors") for n in "ab")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    pa, pb = (torch.load(tmp_path / n / "checkpoint-3" / "trainer_state.pt", weights_only=False)["projections"]
              for n in "ab")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_every_array_reads_the_same_through_tensorstore(workdir, moe_teacher, corpus):
    """The cache is a public contract: an independent Zarr v3 implementation (TensorStore, the one
    JAX/Orbax use) opens every array of a cache with a sampled tail and every rich target, through its
    sharding, blosc and crc32c codecs, and reads what zarr-python reads."""
    pytest.importorskip("tensorstore")  # a dev dependency (pip install -e '.[dev]')
    out = workdir / "tensorstore-cache"
    r = pikv_subprocess(["dump-teacher", "--teacher", moe_teacher, "--data", corpus, "--out", str(out), "--seq-len", "16",
                         "--max-sequences", "10", "--top-k", "8", "--sampled-tail", "4", "--shard-size", "4",
                         "--temperatures", "1,2,4", *RICH_ARGS])
    assert r.returncode == 0, r.stderr[-3000:]
    cache = open_cache(str(out))
    on_disk = sorted(os.path.relpath(os.path.dirname(p), out) for p in glob.glob(f"{out}/**/zarr.json", recursive=True)
                     if zarr.open(os.path.dirname(p), mode="r").__class__.__name__ == "Array")
    assert on_disk == sorted(cache.names) and len(on_disk) >= 15, on_disk
    # In a child process: TensorStore is not fork-safe, and this test process forks DataLoader workers later.
    check = (
        "import sys, numpy as np, tensorstore as ts, zarr\n"
        "out, names = sys.argv[1], sys.argv[2:]\n"
        "for name in names:\n"
        "    theirs = ts.open({'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': f'{out}/{name}'}},\n"
        "                     read=True).result().read().result()\n"
        "    mine = zarr.open_array(f'{out}/{name}', mode='r')[:]\n"
        "    assert theirs.dtype == mine.dtype and theirs.shape == mine.shape, name\n"
        "    np.testing.assert_array_equal(theirs, mine, err_msg=name)\n"
        "    assert mine.any() or name == 'loss_mask', name  # real data, not fill values\n"
        "print('ok', len(names))\n")
    r = subprocess.run([sys.executable, "-c", check, str(out), *cache.names], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == f"ok {len(cache.names)}", r.stderr[-3000:]
