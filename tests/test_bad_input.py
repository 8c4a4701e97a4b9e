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
    with pytest.raises(SystemExit) as exc:
        main()
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


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
    "top-k zero": (dict(extra=["--top-k", "0"]), "--top-k must be at least 1"),
    "top-k above vocab": (dict(extra=["--top-k", "100000"]), "exceeds the teacher's vocabulary"),
    "temperatures not numbers": (dict(extra=["--temperatures", "1,hot"]), "not a comma-separated list"),
    "temperature not positive": (dict(extra=["--temperatures", "1,-2"]), "positive"),
    "temperature repeated": (dict(extra=["--temperatures", "1,2,2"]), "repeats"),
    "out holds something else": (dict(out="@notcache"), "is not a pikv cache"),
    "both fields": (dict(extra=["--text-field", "text", "--chat-field", "c"]), "not both"),
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
    if spec.get("out") == "@notcache":
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("mine")
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
