"""Damage a hostile tester found: each is refused on one line (or caught by verify), never read as data."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import zarr

from conftest import pikv_subprocess
from pikv_offline.cache import layout as Y
from pikv_offline.cache.reader import open_cache
from pikv_offline.cache.verify import check_integrity
from pikv_offline.errors import PikvError


@pytest.fixture(scope="module")
def cache(llama_teacher, corpus, workdir):
    out = workdir / "damage-src"
    p = pikv_subprocess(["dump-teacher", "--teacher", llama_teacher, "--data", corpus, "--out", str(out), "--seq-len",
                         "32", "--top-k", "8", "--temperatures", "1,2", "--shard-size", "4", "--max-sequences", "16",
                         "--sampled-tail", "0", "--encoding", "fp16"])
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def _copy(cache, workdir, name):
    bad = workdir / f"damage-{name}"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(cache, bad)
    return bad


def test_an_empty_shard_file_is_damage(cache, workdir):
    bad = _copy(cache, workdir, "empty")
    f = next(p for p in (bad / "logits" / "logprobs" / "c" / "2").rglob("*") if p.is_file())
    f.write_bytes(b"")
    with pytest.raises(PikvError, match="logits/logprobs: the data of unit 2 .* is missing"):
        open_cache(str(bad))


def test_another_units_logits_are_caught_by_verify(cache, workdir):
    bad = _copy(cache, workdir, "swapped")
    for name in ("logits/id_gaps", "logits/logprobs", "logits/tnorm"):
        src = next(p for p in (bad / name / "c" / "1").rglob("*") if p.is_file())
        dst = bad / name / "c" / "2" / src.relative_to(bad / name / "c" / "1")
        shutil.copyfile(src, dst)
    open_cache(str(bad))  # every file present: only the hashes tell
    with pytest.raises(PikvError, match="unit 2 .* stored arrays that do not hash to its marker's"):
        check_integrity(str(bad))


def test_consistently_edited_root_attributes_are_refused_by_the_markers(cache, workdir):
    bad = _copy(cache, workdir, "edited")
    root = zarr.open_group(str(bad), mode="r+")
    attrs = dict(root.attrs[Y.ROOT_ATTR])
    attrs["targets"] = {**attrs["targets"], "logits": {**attrs["targets"]["logits"], "encoding": "bf16"}}
    attrs["cache_key"] = Y.RootAttrs(**{k: v for k, v in attrs.items()
                                        if k in Y.RootAttrs.__dataclass_fields__}).recomputed_key()
    root.attrs[Y.ROOT_ATTR] = attrs
    with pytest.raises(PikvError, match="the marker of unit 0 does not commit this cache"):
        open_cache(str(bad))


def test_a_planted_lock_symlink_is_not_followed(cache, workdir):
    bad = _copy(cache, workdir, "lock-link")
    victim = workdir / "victim.txt"
    victim.write_text("precious")
    (bad / Y.LOCK_FILE).unlink(missing_ok=True)  # the dump's own lock file, kept in the cache
    os.symlink(victim, bad / Y.LOCK_FILE)
    from pikv_offline import lock

    with pytest.raises(PikvError, match="cannot open its lock file"):
        with lock.hold(str(bad / Y.LOCK_FILE), what="--out x", by="dump"):
            pass
    assert victim.read_text() == "precious"


def test_a_damaged_trainer_state_is_one_line(cache, workdir, student_config):
    import torch

    run = workdir / "damaged-state-run"
    shutil.rmtree(run, ignore_errors=True)
    args = ["train-student", "--cache", str(cache), "--student-config", student_config, "--out", str(run),
            "--max-steps", "2", "--num-workers", "0", "--batch-size", "4"]
    assert pikv_subprocess(args).returncode == 0
    torch.save({}, run / "checkpoint-2" / "trainer_state.pt")
    p = pikv_subprocess([*args[:-6], "--max-steps", "4", "--num-workers", "0", "--batch-size", "4", "--resume"])
    lines = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if ln.startswith("error")]
    assert p.returncode == 2 and len(lines) == 1 and "lacks" in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_the_chat_template_is_part_of_the_preparation(tokenizer, workdir):
    from pikv_offline.data import prepare
    from pikv_offline.modeling import tokenizer_hash

    data = workdir / "chat-template.jsonl"
    data.write_text("\n".join(json.dumps({"m": [{"role": "user", "content": f"q{i}"},
                                                {"role": "assistant", "content": f"a{i}"}]}) for i in range(4)))
    kw = dict(data=str(data), split="train", data_config=None, tokenizer_sha256=tokenizer_hash(tokenizer),
              text_field=None, chat_field="m", seq_len=16, pack=False)
    a = prepare(tokenizer=tokenizer, **kw)
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    b = prepare(tokenizer=other, **kw)
    assert a.fingerprint != b.fingerprint and tokenizer_hash(other) == tokenizer_hash(tokenizer)


def test_a_teachers_own_model_code_runs_only_with_trust_remote_code(llama_teacher, corpus, workdir):
    folder = workdir / "remote-code-teacher"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(llama_teacher, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="shipped", architectures=["ShippedForCausalLM"],
                  auto_map={"AutoConfig": "configuration_shipped.ShippedConfig",
                            "AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_shipped.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['PIKV_TEST_RAN']).write_text('ran')  # what a hostile file would do\n"
        "from transformers import LlamaConfig\n\n\n"
        "class ShippedConfig(LlamaConfig):\n    model_type = 'shipped'\n")
    (folder / "modeling_shipped.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_shipped import ShippedConfig\n\n\n"
        "class ShippedForCausalLM(LlamaForCausalLM):\n    config_class = ShippedConfig\n")
    ran = workdir / "remote-code-ran"
    ran.unlink(missing_ok=True)
    env = {"PIKV_TEST_RAN": str(ran), "HF_MODULES_CACHE": str(workdir / "hf-modules")}
    out = workdir / "remote-code-cache"
    args = ["dump-teacher", "--teacher", str(folder), "--data", corpus, "--out", str(out), "--seq-len", "16",
            "--top-k", "4", "--max-sequences", "4", "--shard-size", "4"]
    p = pikv_subprocess(args, env=env)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert p.returncode == 2 and len(lines) == 1 and "--trust-remote-code" in lines[0], p.stderr[-2000:]
    assert not ran.exists() and not out.exists()
    p = pikv_subprocess([*args, "--trust-remote-code"], env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert ran.read_text() == "ran" and open_cache(str(out)).attrs.teacher["model_type"] == "shipped"
    # the same code as a --student of verify, and as the cache's own tokenizer: refused, never prompted for
    import subprocess
    import sys

    ran.unlink()
    env_all = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    p = subprocess.run([sys.executable, "-m", "pikv_offline", "verify", str(out), "--recompute", "2", "--teacher",
                        str(folder), "--trust-remote-code", "--student", str(folder)], input="y\n", capture_output=True,
                       text=True, env=env_all, timeout=300)
    assert p.returncode == 0 and ran.exists(), p.stderr[-2000:]  # trusted: the teacher's and the student's code
    ran.unlink()
    stranger = workdir / "remote-code-stranger-cache"
    shutil.rmtree(stranger, ignore_errors=True)
    shutil.copytree(out, stranger)
    tok_dir = stranger / Y.TOKENIZER_DIR
    shutil.copy(folder / "configuration_shipped.py", tok_dir / "tokenization_shipped.py")
    tc = json.loads((tok_dir / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": [None, "tokenization_shipped.ShippedTokenizer"]}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tc))
    p = subprocess.run([sys.executable, "-m", "pikv_offline", "verify", str(stranger)], input="y\n",
                       capture_output=True, text=True, env=env_all, timeout=300)
    assert p.returncode == 0 and not ran.exists(), p.stderr[-2000:]  # its own fast tokenizer class, no code run
    p = subprocess.run([sys.executable, "-m", "pikv_offline", "verify", str(out), "--recompute", "2", "--teacher",
                        str(folder), "--student", str(folder)], input="y\n", capture_output=True, text=True,
                       env=env_all, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert p.returncode == 2 and len(lines) == 1 and "--trust-remote-code" in lines[0], p.stderr[-2000:]
    assert not ran.exists()


def test_shipped_code_of_a_known_model_type_is_said_not_run(llama_teacher, corpus, workdir):
    """transformers uses its own class for a known model type whose config has an auto_map: said on one line."""
    folder = workdir / "known-type-auto-map"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(llama_teacher, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    p = pikv_subprocess(["dump-teacher", "--teacher", str(folder), "--data", corpus, "--out", str(workdir / "known-type"),
                         "--seq-len", "16", "--top-k", "4", "--max-sequences", "4", "--shard-size", "4"])
    assert p.returncode == 0 and "ships model code (auto_map) that is not run" in p.stdout, p.stdout + p.stderr[-2000:]
