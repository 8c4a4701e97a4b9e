"""Every bad input of `pikv dump-teacher`: one line on stderr, exit code 2, no traceback, no complete cache."""

from __future__ import annotations

import shutil
import sys

import pytest

from conftest import write_jsonl
from pikv_offline.cache.reader import read_root_attrs
from pikv_offline.cli import main


def run_main(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pikv", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def no_tokenizer_teacher(llama_teacher, workdir):
    path = workdir / "no-tokenizer"
    path.mkdir(exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(f"{llama_teacher}/{f}", path / f)
    return str(path)


CASES = {
    "teacher path missing": (dict(teacher="/nonexistent/teacher"), "does not exist"),
    "teacher id not loadable offline": (dict(teacher="nobody-pikv/no-such-model"), "could not be loaded from the hub"),
    "teacher without tokenizer": (dict(teacher="@no_tokenizer"), "no usable tokenizer"),
    "data path missing": (dict(data="/nonexistent/data.jsonl"), "does not exist"),
    "text field missing": (dict(extra=["--text-field", "body"]), "--text-field 'body' is not a column"),
    "chat field missing": (dict(extra=["--chat-field", "messages"]), "--chat-field 'messages' is not a column"),
    "chat field not turns": (dict(extra=["--chat-field", "text"]), "must hold a list of"),
    "empty data": (dict(data="@empty"), "is empty"),
    "blank texts": (dict(data="@blank"), "no usable tokens"),
    "seq-len above context": (dict(extra=["--seq-len", "4096"]), "exceeds the teacher's context"),
    "top-k zero": (dict(extra=["--top-k", "0", "--sampled-tail", "0"]), "--top-k must be at least 1"),
    "top-k above vocab": (dict(extra=["--top-k", "100000"]), "exceeds the teacher's vocabulary"),
    "sampled tail above 255": (dict(extra=["--sampled-tail", "300"]), "--sampled-tail must be in [0, 255]"),
    "sampled tail without a tail": (dict(extra=["--top-k", "512", "--sampled-tail", "4"]), "needs a tail"),
    "the default tail without a tail": (dict(extra=["--top-k", "512"]), "give --sampled-tail 0"),
    "temperatures not numbers": (dict(extra=["--temperatures", "1,hot"]), "not a comma-separated list"),
    "temperature not positive": (dict(extra=["--temperatures", "1,-2"]), "positive"),
    "temperature repeated": (dict(extra=["--temperatures", "1,2,2"]), "repeats"),
    "out holds something else": (dict(out="@notcache"), "is not a pikv cache"),
    "both fields": (dict(extra=["--text-field", "text", "--chat-field", "c"]), "not both"),
    "binary data": (dict(data="@binary"), "binary.jsonl is not UTF-8 text (invalid start byte at byte 128)"),
    "chat content a number": (dict(data="@chat-int", extra=["--chat-field", "c"]), "role and content must be strings"),
    "chat content a list": (dict(data="@chat-list", extra=["--chat-field", "c"]), "role and content must be strings"),
    "chat turn without a role": (dict(data="@chat-norole", extra=["--chat-field", "c"]), "has no role/content"),
    "chat turns not a list": (dict(data="@chat-dict", extra=["--chat-field", "c"]), "must hold a list of"),
    "seq-len 1": (dict(extra=["--seq-len", "1"]), "--seq-len must be at least 2"),
    "temperature zero": (dict(extra=["--temperatures", "1,0"]), "positive"),
    "temperature inf": (dict(extra=["--temperatures", "1,inf"]), "positive finite"),
    "temperature nan": (dict(extra=["--temperatures", "1,nan"]), "positive finite"),
    "batch-size 0": (dict(extra=["--batch-size", "0"]), "--batch-size must be at least 1"),
    "out is a file": (dict(out="@file"), "is not a pikv cache"),
    "tail temperature off the grid": (dict(extra=["--sampled-tail", "4", "--tail-temperatures", "1,3"]),
                                      "--tail-temperatures 3 is not in the grid"),
    "tail temperatures without a tail": (dict(extra=["--sampled-tail", "0", "--tail-temperatures", "2"]),
                                         "add --sampled-tail N"),
    "more tail temperatures than draws": (dict(extra=["--sampled-tail", "2", "--tail-temperatures", "1,2,4"]),
                                          "lists 3 temperatures but --sampled-tail 2 draws only 2"),
    "tail temperatures not numbers": (dict(extra=["--sampled-tail", "2", "--tail-temperatures", "hot"]),
                                      "not a comma-separated list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, capsys, monkeypatch, llama_teacher, corpus, workdir, no_tokenizer_teacher):
    spec, expected = CASES[case]
    out = workdir / f"bad-{case.replace(' ', '-')}"
    teacher = {"@no_tokenizer": no_tokenizer_teacher}.get(spec.get("teacher"), spec.get("teacher", llama_teacher))
    data = spec.get("data", corpus)
    if data == "@empty":
        data = str(workdir / "empty.jsonl")
        open(data, "w").close()
    elif data == "@blank":
        data = write_jsonl(workdir / "blank.jsonl", [{"text": "   "}, {"text": ""}])
    elif data == "@binary":
        data = str(workdir / "binary.jsonl")
        open(data, "wb").write(bytes(range(256)) * 64)
    elif data.startswith("@chat-"):
        turns = {"int": [{"role": "user", "content": 5}], "list": [{"role": "user", "content": ["a"]}],
                 "norole": [{"content": "hi"}], "dict": {"role": "user", "content": "hi"}}[data[6:]]
        data = write_jsonl(workdir / f"chat-{data[6:]}.jsonl", [{"c": turns}, {"c": turns}])
    if spec.get("out") == "@notcache":
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("mine")
    if spec.get("out") == "@file":
        out.write_text("mine")
    args = ["dump-teacher", "--teacher", teacher, "--data", data, "--out", str(out), "--seq-len", "32",
            "--max-sequences", "2", *spec.get("extra", [])]
    code, stdout, stderr = run_main(args, capsys, monkeypatch)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in stderr + stdout
    attrs = read_root_attrs(str(out))
    assert attrs is None or not attrs.get("complete")
    if spec.get("out") == "@notcache":
        assert (out / "notes.txt").read_text() == "mine"


# ---- pikv train-student --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_caches(train_cache, workdir):
    """An incomplete copy and an unknown-version copy of the training cache."""
    import zarr

    out = {}
    def logits(**change):
        return lambda a: {**a, "targets": {**a["targets"], "logits": {**a["targets"]["logits"], **change}}}

    for name, change in (("incomplete", {"complete": False}), ("future", {"format_version": 99}),
                         ("escape", {"tokenizer_dir": "../../.."}), ("typed", {"unit_seqs": "8"}),
                         ("boolcount", {"seq_len": True}), ("grid", logits(temperatures=[1.0, 3.0])),
                         ("nohead", logits(top_k=0, sampled_tail=4, tail_temperatures=[1.0])), ("nangrid", logits(temperatures=[1.0, "nan"])),
                         ("proposal", logits(sampled_tail=4, tail_temperatures=[3.0])),
                         ("proposal-no-tail", logits(tail_temperatures="x")),
                         ("nolayers", lambda a: {**a, "teacher": {k: v for k, v in a["teacher"].items()
                                                                   if k != "num_layers"}})):
        path = workdir / f"cache-{name}"
        if not path.exists():
            shutil.copytree(train_cache, path)
            root = zarr.open_group(str(path), mode="r+")
            attrs = dict(root.attrs["pikv"])
            root.attrs["pikv"] = change(attrs) if callable(change) else {**attrs, **change}
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def mismatched_students(workdir, texts, tokenizer):
    from pikv_offline.tools.toy import make_model, train_tokenizer

    small = workdir / "student-small-vocab"
    make_model("llama", 100, hidden=32, layers=1, context=64).save_pretrained(small)
    other = workdir / "student-other-tokenizer"
    other_tok = train_tokenizer(texts[::-1][:200], vocab_size=len(tokenizer))
    make_model("llama", len(other_tok), hidden=32, layers=1, context=64).save_pretrained(other)
    other_tok.save_pretrained(other)
    return {"small": str(small), "other": str(other)}


TRAIN_CASES = {
    "cache missing": (["--cache", "/nonexistent/cache"], "does not exist"),
    "cache incomplete": (["--cache", "@incomplete"], "incomplete cache"),
    "cache version unknown": (["--cache", "@future"], "format version 99"),
    "vocab too small": (["--student", "@small"], "does not cover the teacher's"),
    "tokenizer mismatch": (["--student", "@other"], "tokenizer differs"),
    "temperature off grid": (["--temperature", "3"], "not in the cache's grid"),
    "top-k above cached": (["--top-k", "17"], "above the cached k of 16"),
    "sampled tail not in cache": (["--tail", "sampled"], "holds no sampled tail"),
    "both student flags": (["--student", "@small", "--student-config", "@config"], "exactly one of --student"),
    "no student flag": (["--no-student"], "exactly one of --student"),
    "resume with nothing": (["--resume"], "holds no checkpoint"),
    "neither steps nor epochs": (["--no-steps"], "exactly one of --max-steps or --epochs"),
    "several loader workers": (["--num-workers", "2"], "--num-workers must be 0 or 1"),
    "tokenizer_dir outside the cache": (["--cache", "@escape"], "attribute tokenizer_dir is '../../..'"),
    "unit_seqs of the wrong type": (["--cache", "@typed"], "attribute unit_seqs is '8', expected int"),
    "a bool where an int belongs": (["--cache", "@boolcount"], "attribute seq_len is True, expected int"),
    "temperature grid tampered": (["--cache", "@grid"], "is not the hash of the attributes that define its content"),
    "top_k tampered to 0": (["--cache", "@nohead"], "is not the hash of the attributes"),
    "a temperature that is not a number": (["--cache", "@nangrid"], "is not a valid head/tail/temperature"),
    "a tail proposal off the grid": (["--cache", "@proposal"], "tail_temperatures [3.0] is not a list of grid"),
    "a tail proposal on a cache without a tail": (["--cache", "@proposal-no-tail"], "tail_temperatures 'x' is not"),
    "num_layers missing": (["--cache", "@nolayers"], "attribute num_layers is None, expected int"),
    "lr nan": (["--lr", "nan"], "--lr must be a positive finite number; got nan"),
    "lr inf": (["--lr", "inf"], "--lr must be a positive finite number; got inf"),
    "lr zero": (["--lr", "0"], "--lr must be a positive finite number"),
    "lr negative": (["--lr", "-1e-3"], "--lr must be a positive finite number"),
    "max-steps 0": (["--no-steps", "--max-steps", "0"], "--max-steps / --epochs must be positive"),
    "epochs inf": (["--no-steps", "--epochs", "inf"], "--max-steps / --epochs must be positive"),
    "batch-size 0": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "weight decay nan": (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    "malformed student config": (["--no-student", "--student-config", "@badjson"], "not a usable model config json"),
    "out is a file": (["--out", "@file"], "is a file; give a folder"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input(case, capsys, monkeypatch, train_cache, student_config, workdir, bad_caches,
                         mismatched_students):
    extra, expected = TRAIN_CASES[case]
    (workdir / "bad-student.json").write_text('{"model_type": "llama", "hidden_size": ')
    (workdir / "a-file").write_text("x")
    subst = {**{f"@{k}": v for k, v in bad_caches.items()}, "@badjson": str(workdir / "bad-student.json"),
             "@file": str(workdir / "a-file"),
             "@small": mismatched_students["small"], "@other": mismatched_students["other"],
             "@config": student_config}
    extra = [subst.get(a, a) for a in extra]
    args = ["train-student"] + ([] if "--out" in extra else ["--out", str(workdir / f"bad-train-{case.replace(' ', '-')}")])
    args += [] if "--batch-size" in extra else ["--batch-size", "2"]
    if "--num-workers" not in extra:
        args += ["--num-workers", "0"]
    if "--cache" not in extra:
        args += ["--cache", train_cache]
    if "--student" not in extra and "--no-student" not in extra:
        args += ["--student-config", student_config]
    if "--no-steps" not in extra:
        args += ["--max-steps", "1"]
    args += [a for a in extra if a not in ("--no-student", "--no-steps")]
    code, stdout, stderr = run_main(args, capsys, monkeypatch)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert "Traceback" not in stderr + stdout


@pytest.mark.parametrize("change, expected", [(["--seed", "1"], "data order"),
                                              (["--fake-world"], "written by 2 ranks")])
def test_resume_refuses_changed_order_or_world(change, expected, capsys, monkeypatch, train_cache,
                                               student_config, tmp_path):
    import torch

    base = ["train-student", "--cache", train_cache, "--student-config", student_config, "--out",
            str(tmp_path / "r"), "--batch-size", "2", "--num-workers", "0", "--max-steps", "2"]
    code, _, err = run_main(base, capsys, monkeypatch)
    assert code == 0, err
    if change == ["--fake-world"]:
        state_path = tmp_path / "r" / "checkpoint-2" / "trainer_state.pt"
        state = torch.load(state_path, weights_only=False)
        state["world_size"] = 2
        torch.save(state, state_path)
        change = []
    code, _, err = run_main(base + ["--resume", *change], capsys, monkeypatch)
    assert code == 2 and expected in err and "Traceback" not in err


def test_missing_logger_package_is_one_line(capsys, monkeypatch, train_cache, student_config, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    code, _, err = run_main(["train-student", "--cache", train_cache, "--student-config", student_config,
                             "--out", str(tmp_path / "tb"), "--max-steps", "1", "--num-workers", "0",
                             "--tensorboard"], capsys, monkeypatch)
    assert code == 2 and "pip install tensorboard" in err and "Traceback" not in err


@pytest.mark.parametrize("args, missing", [
    (["dump-teacher"], "--teacher"), (["train-student", "--cache", "c", "--student-config", "s"], "--out"),
    (["eval", "--cache", "x"], "--student"), (["make-student", "--teacher", "t", "--out", "o"], "--keep-layers"),
    (["sweep", "--student-config", "s", "--max-steps", "1", "--grid", "temperature=1"], "--cache"),
    (["sweep", "--cache", "c", "--student-config", "s", "--grid", "temperature=1"], "--out"),
    (["inspect"], "CACHE_DIR"), (["verify"], "CACHE_DIR")])
def test_a_missing_required_option_is_clicks_usage_error(args, missing, capsys, monkeypatch):
    code, stdout, stderr = run_main(args, capsys, monkeypatch)
    assert code == 2 and "Missing" in stderr and missing in stderr and "Traceback" not in stderr + stdout, stderr


@pytest.mark.parametrize("args, expected", [
    (["eval", "--cache", "c", "--student", "s", "--eval-fraction", "2"], "--eval-fraction must be in (0, 1]; got 2.0"),
    (["verify", "c", "--recompute", "2", "--teacher", "t", "--batch-size", "0"], "--batch-size must be at least 1; got 0")])
def test_eval_and_verify_flags_are_checked(args, expected, capsys, monkeypatch):
    code, stdout, stderr = run_main(args, capsys, monkeypatch)
    assert code == 2 and stderr.strip() == f"error: {expected}", stderr


def test_streaming_needs_max_sequences():
    from pikv_offline.config import DumpConfig
    from pikv_offline.errors import PikvError

    with pytest.raises(PikvError, match="--streaming reads a hub dataset only as far as needed: give --max-sequences"):
        DumpConfig(teacher="t", data="some/hub-dataset", out="o", streaming=True)


def test_a_config_file_sets_flags_and_the_command_line_wins(capsys, monkeypatch, train_cache, student_config, tmp_path):
    """--config: YAML keys are the flag names (dashes or underscores, --no-X flags, lists for '1,2' values);
    a flag on the command line overrides the file; the run saves the resolved config as always."""
    import json

    run = tmp_path / "from-config"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"cache: {train_cache}\nstudent-config: {student_config}\nout: {run}\nmax_steps: 2\n"
                   "lr: 1.0e-3\ntemperature: 2\nnum-workers: 0\nschedule: constant\nfreeze: [embeddings]\n")
    code, _, err = run_main(["train-student", "--config", str(cfg), "--max-steps", "3"], capsys, monkeypatch)
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert (saved["max_steps"], saved["lr"], saved["temperature"], saved["schedule"]) == (3, 1e-3, 2.0, "constant")
    assert saved["freeze"] == ["embeddings"] and saved["num_workers"] == 0
    js = tmp_path / "dump.json"
    js.write_text(json.dumps({"teacher": "t", "data": "d", "out": "o", "temperatures": [1, 3], "no-pack": True,
                              "targets": "hidden:1"}))
    from pikv_offline import cli

    seen = {}
    monkeypatch.setattr("pikv_offline.teacher.dump.run", lambda c: seen.__setitem__("cfg", c))
    code, _, err = run_main(["dump-teacher", "--config", str(js), "--temperatures", "1,2"], capsys, monkeypatch)
    assert code == 0 and cli is not None, err
    c = seen["cfg"]
    assert (c.teacher, c.temperatures, c.pack, c.targets) == ("t", (1.0, 2.0), False, (("hidden", (1,), "bf16"),))
    later = tmp_path / "later.yaml"
    later.write_text("teacher: t2\ntop_k: 5\n")
    code, _, err = run_main(["dump-teacher", "--config", str(js), "--config", str(later)], capsys, monkeypatch)
    assert code == 0, err
    c = seen["cfg"]
    assert (c.teacher, c.top_k, c.temperatures, c.pack) == ("t2", 5, (1.0, 3.0), False)  # the later file wins



@pytest.mark.parametrize("text, expected", [
    ("lr: [1, 2]\n", "--config CFG: lr takes a number"), ("bogus: 1\n", "'bogus' is not a setting of `pikv train-student`"),
    ("max-steps: .inf\n", "max-steps takes an integer"), ("max-steps: 2.5\n", "max-steps takes an integer"),
    ("max-steps: true\n", "max-steps takes an integer"), ("out: null\n", "out takes a value"),
    ("out: [a, b]\n", "out takes one text value"), ("tensorboard: 1\n", "tensorboard takes true or false"),
    ("- a\n- b\n", "expected a mapping of flag names to values, got list"), ("a: [\n", "not valid YAML or JSON"),
    ("no-pack: 1\n", "'no-pack' is not a setting"), ("lr: fast\n", None)])
def test_a_bad_config_file_is_one_line(text, expected, capsys, monkeypatch, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    code, stdout, stderr = run_main(["train-student", "--config", str(cfg), "--cache", "c", "--out", "o"], capsys,
                                    monkeypatch)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in stderr + stdout, stderr
    if expected:
        assert len(lines) == 1 and expected.replace("CFG", str(cfg)) in lines[0], stderr
    code, _, stderr = run_main(["inspect", "--config", str(tmp_path / "missing.yaml")], capsys, monkeypatch)
    assert code == 2 and "cannot read it" in stderr, stderr
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    code, _, stderr = run_main(["inspect", "--config", str(binary)], capsys, monkeypatch)
    assert code == 2 and "not UTF-8 text" in stderr and "Traceback" not in stderr, stderr


def test_every_command_has_one_config_option(capsys, monkeypatch):
    """sweep takes the options of two configs; --config is still one option (click warns of a duplicate)."""
    import warnings

    for command in ("dump-teacher", "inspect", "verify", "train-student", "sweep", "make-student", "eval"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            code, out, err = run_main([command, "--help"], capsys, monkeypatch)
        assert code == 0 and out.count("--config FILE") == 1, (command, err)
