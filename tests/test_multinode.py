"""Two nodes, simulated by two torchrun launchers on this machine (c10d rendezvous on localhost), each
with a node-local datasets cache: a 2-node dump equals a 1-process dump per sample id, bitwise, and a
2-node training run ends with the weights of a 1-process run of the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, pikv_subprocess
from pikv_offline.cache.reader import open_cache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], tmp_path, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "HF_DATASETS_CACHE": str(tmp_path / f"node-{node}-datasets")}  # each node its own local disk
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
               "--rdzv-id", "pikv-test", "-m", "pikv_offline", *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _dump_args(teacher, data, out):
    return ["dump-teacher", "--teacher", teacher, "--data", data, "--out", str(out), "--seq-len", "32",
            "--top-k", "8", "--sampled-tail", "4", "--temperatures", "1,2", "--shard-size", "4", "--batch-size", "2",
            "--max-sequences", "18"]


@pytest.fixture(scope="module")
def one_process_cache(llama_teacher, corpus, workdir):
    out = workdir / "mn-one"
    p = pikv_subprocess(_dump_args(llama_teacher, corpus, out))
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def test_two_node_dump_equals_one_process(llama_teacher, corpus, one_process_cache, tmp_path):
    out = tmp_path / "mn-two"
    for p in two_nodes(_dump_args(llama_teacher, corpus, out), tmp_path):
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = open_cache(str(one_process_cache)), open_cache(str(out))
    assert a.attrs.cache_key == b.attrs.cache_key and a.attrs.content_sha256 == b.attrs.content_sha256
    ra, rb = a.read_all(), b.read_all()
    for name in ra:
        np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)


def test_two_node_training_equals_one_process(one_process_cache, student_config, tmp_path):
    common = ["train-student", "--cache", str(one_process_cache), "--student-config", student_config,
              "--max-steps", "3", "--lr", "3e-3", "--eval-fraction", "0.1", "--num-workers", "0", "--ce-weight", "0.5"]
    p = pikv_subprocess([*common, "--out", str(tmp_path / "one"), "--batch-size", "4"])
    assert p.returncode == 0, p.stderr[-2000:]
    for p in two_nodes([*common, "--out", str(tmp_path / "two"), "--batch-size", "2"], tmp_path):
        assert p.returncode == 0, p.stderr[-3000:]
    wa, wb = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("one", "two"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
