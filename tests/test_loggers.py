"""--tensorboard and --wandb, for real: what a run logs is read back from the loggers' own files and
equals metrics.jsonl. --device-map auto (accelerate) runs a dump on CPU."""

from __future__ import annotations

import glob
import json
import struct

import numpy as np
import pytest

from conftest import pikv_subprocess
from pikv_offline.cache.reader import open_cache


def _wandb_history(path: str) -> list[dict]:
    """The history rows of an offline W&B run file (run-ID.wandb): a LevelDB-style log of protobuf
    records in 32 KiB blocks (a 7-byte file header, then records of crc32 u32, length u16, type u8:
    1 full, 2 first, 3 middle, 4 last). wandb >= 0.2x reads it in its Go core only."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B", raw[:7]
    rows, parts, pos, block = [], [], 7, 32768
    while pos + 7 <= len(raw):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if n == 0 and kind == 0:
            pos += room - 7
            continue
        parts.append(raw[pos:pos + n])
        pos += n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_tensorboard_and_wandb_hold_what_was_logged(train_cache, student_config, workdir):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = workdir / "loggers-run"
    p = pikv_subprocess(["train-student", "--cache", train_cache, "--student-config", student_config, "--out", str(run),
                         "--max-steps", "4", "--log-every", "1", "--num-workers", "0", "--batch-size", "4",
                         "--eval-every", "2", "--tensorboard", "--wandb"],
                        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(run)})
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "kd", "lr", "grad_norm", "eval_ce"} <= tags, tags
    for key in ("loss", "kd", "lr", "grad_norm"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        want = [(r["step"], r[key]) for r in train_rows]
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)  # float32 events
    assert [e.step for e in events.Scalars("eval_ce")] == [r["step"] for r in rows if "eval_ce" in r]

    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    history = _wandb_history(files[0])
    logged = [h for h in history if "loss" in h]
    assert [h["_step"] for h in logged] == [1, 2, 3, 4]
    for h, r in zip(logged, train_rows):
        for key in ("loss", "kd", "lr", "grad_norm", "tokens_per_s"):
            assert h[key] == pytest.approx(r[key], rel=1e-12), key
    assert any("eval_ce" in h for h in history)


def test_device_map_auto_dumps_on_cpu(llama_teacher, corpus, workdir):
    """--device-map auto (accelerate) places the teacher itself; on a CPU-only machine it lands on the
    CPU and the cache equals a plain dump's."""
    pytest.importorskip("accelerate")
    args = ["dump-teacher", "--teacher", llama_teacher, "--data", corpus, "--seq-len", "16", "--top-k", "4",
            "--max-sequences", "6", "--shard-size", "4"]
    a, b = workdir / "device-map-auto", workdir / "device-map-none"
    p = pikv_subprocess([*args, "--out", str(a), "--device-map", "auto"])
    assert p.returncode == 0, p.stderr[-3000:]
    p = pikv_subprocess([*args, "--out", str(b)])
    assert p.returncode == 0, p.stderr[-3000:]
    ca, cb = open_cache(str(a)), open_cache(str(b))
    assert ca.attrs.cache_key == cb.attrs.cache_key
    for name in ca.names:
        np.testing.assert_array_equal(ca.arrays[name][:], cb.arrays[name][:], err_msg=name)
