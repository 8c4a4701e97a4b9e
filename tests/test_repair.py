"""`pikv dump-teacher ... --repair`: damaged units (and a damaged skeleton) recomputed, the rest kept,
the result bitwise the undamaged cache and verify passing; refusals on one line."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import zarr

from conftest import pikv_subprocess
from pikv_offline.cache import format as F
from pikv_offline.cache import layout as Y
from pikv_offline.cache.reader import open_cache
from pikv_offline.cache.verify import check_integrity


def _args(teacher, corpus, out, *extra):
    return ["dump-teacher", "--teacher", teacher, "--data", corpus, "--out", str(out), "--seq-len", "32",
            "--top-k", "8", "--temperatures", "1,2", "--shard-size", "4", "--max-sequences", "22",
            "--sampled-tail", "4", *extra]


@pytest.fixture(scope="module")
def good(llama_teacher, corpus, workdir):
    out = workdir / "repair-good"
    p = pikv_subprocess(_args(llama_teacher, corpus, out))
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def _shard(cache_dir, name, unit):
    return next(p for p in (cache_dir / name / "c" / str(unit)).rglob("*") if p.is_file())


def _same_content(a, b):
    ca, cb = open_cache(str(a)), open_cache(str(b))
    for name in ca.names:
        assert np.array_equal(ca.arrays[name][:], cb.arrays[name][:]), name
    for u in range(ca.attrs.n_units):
        assert Y.read_marker(str(a), u) == Y.read_marker(str(b), u), u
    assert ca.attrs.content_sha256 == cb.attrs.content_sha256 and ca.attrs.counts == cb.attrs.counts


def _one_error_line(p):
    lines = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if ln.startswith("error")]
    return p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr


def test_repair_recomputes_only_the_damaged_units_at_two_ranks(good, llama_teacher, corpus, workdir):
    bad = workdir / "repair-many"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(good, bad)
    f = _shard(bad, F.HEAD_LOGPROBS, 0)  # a flipped byte: crc32c
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    f = _shard(bad, F.TNORM, 1)  # truncated
    f.write_bytes(f.read_bytes()[:10])
    _shard(bad, F.INPUT_IDS, 2).unlink()  # deleted: would read back as zeros
    (bad / Y.marker_name(3)).unlink()  # a unit of a complete cache without its marker
    _shard(bad, F.TAIL_COUNTS, 5).unlink()  # the last, partial unit (rows 20..21)
    kept = {u: _shard(bad, F.HEAD_IDS, u).stat().st_mtime_ns for u in (4,)}
    p = pikv_subprocess(_args(llama_teacher, corpus, bad, "--repair"), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "5 damaged units" in p.stdout and "verify passed" in p.stdout, p.stdout
    assert _shard(bad, F.HEAD_IDS, 4).stat().st_mtime_ns == kept[4]  # an undamaged unit is not rewritten
    _same_content(good, bad)
    check_integrity(str(bad))


def test_repair_rebuilds_a_damaged_skeleton(good, llama_teacher, corpus, workdir):
    bad = workdir / "repair-skeleton"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(good, bad)
    (bad / "zarr.json").write_text("{not json")  # the root
    (bad / F.TAIL_IDS / "zarr.json").unlink()  # an array's metadata
    (bad / Y.TOKENIZER_DIR / "tokenizer.json").unlink()
    (bad / Y.marker_name(1)).write_text('{"unit": 1')  # a torn marker
    p = pikv_subprocess(_args(llama_teacher, corpus, bad, "--repair"))
    assert p.returncode == 0, p.stderr[-3000:]
    for said in ("rebuilt the root attributes", f"rewrote the metadata of {F.TAIL_IDS}", "saved the tokenizer again",
                 "1 damaged unit: unit 1 (sequences [4, 8)) has a damaged marker", "verify passed"):
        assert said in p.stdout, (said, p.stdout)
    _same_content(good, bad)


def test_repair_of_a_whole_cache_recomputes_nothing(good, llama_teacher, corpus, workdir):
    same = workdir / "repair-none"
    shutil.rmtree(same, ignore_errors=True)
    shutil.copytree(good, same)
    before = {p: p.stat().st_mtime_ns for p in same.rglob("*") if p.is_file()}
    p = pikv_subprocess(_args(llama_teacher, corpus, same, "--repair"), env={"PIKV_FAULT": "forward:1"})
    assert p.returncode == 0 and "every unit checks out" in p.stdout and "verify passed" in p.stdout, p.stderr
    after = {p: p.stat().st_mtime_ns for p in same.rglob("*") if p.is_file() and p.name != Y.LOCK_FILE}
    assert after == {k: v for k, v in before.items() if k.name != Y.LOCK_FILE}


def test_repair_refuses_what_it_cannot_repair(good, llama_teacher, corpus, workdir):
    p = pikv_subprocess(_args(llama_teacher, corpus, good, "--repair", "--top-k", "4"))  # other inputs
    assert _one_error_line(p) and "holds a cache of other inputs" in p.stderr, p.stderr
    p = pikv_subprocess(_args(llama_teacher, corpus, workdir / "repair-nothing-here", "--repair"))
    assert _one_error_line(p) and "holds no cache to repair" in p.stderr, p.stderr
    assert not os.path.exists(workdir / "repair-nothing-here")
    p = pikv_subprocess(_args(llama_teacher, corpus, good, "--repair", "--overwrite"))
    assert _one_error_line(p) and "give one of them" in p.stderr, p.stderr
    stranger = workdir / "repair-stranger"
    stranger.mkdir(exist_ok=True)
    (stranger / "notes.txt").write_text("mine")
    p = pikv_subprocess(_args(llama_teacher, corpus, stranger, "--repair"))
    assert _one_error_line(p) and "none of its units were written by this command" in p.stderr, p.stderr
    assert sorted(os.listdir(stranger)) == ["notes.txt"]
    assert zarr.open_group(str(good), mode="r").attrs[Y.ROOT_ATTR]["complete"]


def test_repair_never_writes_or_deletes_outside_the_cache(good, llama_teacher, corpus, workdir):
    """A planted zarr.json.tmp link is not written through; a chunk folder that is a link out of the cache
    is refused on one line with nothing outside deleted; a chunk folder replaced by a file is repaired."""
    outside = workdir / "repair-outside"
    shutil.rmtree(outside, ignore_errors=True)
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("precious")
    bad = workdir / "repair-tmp-link"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(good, bad)
    (bad / F.HEAD_LOGPROBS / "zarr.json.tmp").symlink_to(victim)
    (bad / F.HEAD_LOGPROBS / "zarr.json").write_text("{bad")
    p = pikv_subprocess(_args(llama_teacher, corpus, bad, "--repair"))
    assert p.returncode == 0 and f"rewrote the metadata of {F.HEAD_LOGPROBS}" in p.stdout, p.stderr[-2000:]
    assert victim.read_text() == "precious" and not (bad / F.HEAD_LOGPROBS / "zarr.json").is_symlink()
    _same_content(good, bad)

    linked = workdir / "repair-dir-link"
    shutil.rmtree(linked, ignore_errors=True)
    shutil.copytree(good, linked)
    shutil.move(linked / F.TNORM / "c", outside / "tnorm-c")
    (linked / F.TNORM / "c").symlink_to(outside / "tnorm-c")
    next(p for p in (outside / "tnorm-c" / "3").rglob("*") if p.is_file()).unlink()  # unit 3 damaged behind the link
    before = sorted(p.name for p in (outside / "tnorm-c").rglob("*"))
    p = pikv_subprocess(_args(llama_teacher, corpus, linked, "--repair"))
    assert _one_error_line(p) and "is a symbolic link" in p.stderr, p.stderr[-2000:]
    assert sorted(p.name for p in (outside / "tnorm-c").rglob("*")) == before and victim.read_text() == "precious"

    filed = workdir / "repair-file-for-folder"
    shutil.rmtree(filed, ignore_errors=True)
    shutil.copytree(good, filed)
    shutil.rmtree(filed / F.TNORM / "c")
    (filed / F.TNORM / "c").write_text("x")
    p = pikv_subprocess(_args(llama_teacher, corpus, filed, "--repair"))
    assert p.returncode == 0 and "verify passed" in p.stdout, p.stderr[-2000:]
    _same_content(good, filed)


def test_a_dead_preparation_is_one_line(llama_teacher, corpus, workdir):
    p = pikv_subprocess(_args(llama_teacher, corpus, workdir / "repair-prep-died"),
                        env={"PIKV_FAULT": "prepare:1", "HF_DATASETS_CACHE": str(workdir / "hf-prep-died")})
    assert _one_error_line(p) and "the data preparation process died (exit code -9)" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("edit", ["top_k", "sequences", "unit_seqs"])
def test_repair_trusts_the_markers_over_an_edited_root(edit, good, llama_teacher, corpus, workdir):
    """A root edited consistently (k changed and its key recomputed; the count; the unit size): the units'
    markers still say what the command wrote, so the root is rebuilt and the cache is the undamaged one."""
    bad = workdir / f"repair-edited-{edit}"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(good, bad)
    root = zarr.open_group(str(bad), mode="r+")
    attrs = dict(root.attrs[Y.ROOT_ATTR])
    if edit == "top_k":
        attrs["targets"] = {**attrs["targets"], "logits": {**attrs["targets"]["logits"], "top_k": 4}}
        attrs["cache_key"] = Y.RootAttrs(**{k: v for k, v in attrs.items()
                                            if k in Y.RootAttrs.__dataclass_fields__}).recomputed_key()
    elif edit == "sequences":
        attrs["counts"] = {**attrs["counts"], "sequences": 20}
    else:
        attrs["unit_seqs"] = 2
    root.attrs[Y.ROOT_ATTR] = attrs
    p = pikv_subprocess(_args(llama_teacher, corpus, bad, "--repair"))
    assert p.returncode == 0 and "disagree with its units' markers" in p.stdout, p.stdout + p.stderr[-2000:]
    assert "verify passed" in p.stdout
    _same_content(good, bad)
