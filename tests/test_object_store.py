"""Caches on an object store: an S3-compatible server (moto's) started on localhost for these tests.

Dump to s3://, resume after a kill, commit-last, completeness, cache hit, inspect, verify and training
from it hold as on a local folder, and the arrays are bitwise those of a local dump.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import pikv_subprocess

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "pikv-test"
SEQ = 32


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free local port, its endpoint and fake credentials in the environment (as
    botocore and s3fs read them), and one bucket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        import boto3
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        server.terminate()
        server.wait(10)
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _args(teacher, data, out, n=12, extra=()):
    return ["dump-teacher", "--teacher", teacher, "--data", data, "--out", out, "--seq-len", str(SEQ),
            "--top-k", "8", "--temperatures", "1,2", "--shard-size", "4", "--batch-size", "4",
            "--max-sequences", str(n), "--sampled-tail", "4", "--encoding", "bf16", *extra]


def _fs():
    import s3fs
    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(scope="module")
def local_cache(llama_teacher, corpus, workdir):
    out = str(workdir / "s3-twin-local")
    p = pikv_subprocess(_args(llama_teacher, corpus, out))
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def remote_cache(s3, llama_teacher, corpus):
    url = f"s3://{BUCKET}/plain"
    p = pikv_subprocess(_args(llama_teacher, corpus, url), env=s3)
    assert p.returncode == 0, p.stderr[-3000:]
    return url


def test_dump_to_s3_equals_local_and_is_a_hit(s3, remote_cache, llama_teacher, corpus, local_cache):
    from pikv_offline.cache.reader import describe, open_cache
    from pikv_offline.cache.verify import check_integrity

    url = remote_cache
    remote, here = open_cache(url), open_cache(local_cache)
    assert remote.attrs.cache_key == here.attrs.cache_key and remote.attrs.complete
    got, want = remote.read_all(), here.read_all()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert remote.attrs.content_sha256 == here.attrs.content_sha256
    assert describe(url)["bytes_per_token"] == describe(local_cache)["bytes_per_token"]
    assert check_integrity(url)["units"] == 3
    assert not _fs().exists(f"{BUCKET}/plain/.pikv-dump.lock")  # the lease is gone with its dump
    p = pikv_subprocess(_args(llama_teacher, corpus, url), env=s3)
    assert p.returncode == 0 and "cache hit" in p.stdout, p.stderr[-2000:]


@pytest.mark.parametrize("fault", ["write:2"])  # commit:1 and the others: test_dump.py, the same code on a folder
def test_killed_on_s3_resumes_to_the_same_cache(fault, s3, llama_teacher, corpus, local_cache, student_config,
                                                tmp_path):
    """Killed after a unit's data but before its marker (write) or after its marker (commit): the cache is
    incomplete and refused, the marker is the commit, and the same command finishes it."""
    from pikv_offline.cache.reader import open_cache
    from pikv_offline.errors import PikvError

    url = f"s3://{BUCKET}/killed-{fault.replace(':', '-')}"
    p = pikv_subprocess(_args(llama_teacher, corpus, url), env={**s3, "PIKV_FAULT": fault})
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    with pytest.raises(PikvError, match="incomplete"):
        open_cache(url)
    assert open_cache(url, allow_incomplete=True).committed_units() == [0]  # unit 1's data without its marker
    # the dead dump's lease is there: creating the cache did not clear it (zarr's mode "w" did, once)
    assert _fs().exists(f"{BUCKET}/killed-{fault.replace(':', '-')}/.pikv-dump.lock")
    p = pikv_subprocess(["train-student", "--cache", url, "--out", str(tmp_path / "run"), "--student-config",
                         student_config, "--max-steps", "1"], env=s3)
    assert p.returncode == 2 and "incomplete" in p.stderr, p.stderr[-2000:]
    p = pikv_subprocess(_args(llama_teacher, corpus, url), env=s3)  # the dead dump's lease is taken over
    assert p.returncode == 0 and "resuming" in p.stdout, p.stderr[-3000:]
    got, want = open_cache(url).read_all(), open_cache(local_cache).read_all()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_deleted_shard_object_is_damage_and_a_live_lease_refuses(s3, llama_teacher, corpus):
    from pikv_offline.cache.reader import open_cache
    from pikv_offline.errors import PikvError

    url = f"s3://{BUCKET}/damaged"
    p = pikv_subprocess(_args(llama_teacher, corpus, url, n=12), env=s3)
    assert p.returncode == 0, p.stderr[-3000:]
    fs = _fs()
    fs.rm(f"{BUCKET}/damaged/logits/tail_id_gaps/c/1/0/0")
    with pytest.raises(PikvError, match="unit 1 .* is missing"):
        open_cache(url)
    p = pikv_subprocess(["verify", url], env=s3)
    assert p.returncode == 2 and "logits/tail_id_gaps" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    # --repair on an object store: the damaged unit (and a garbage marker's) recomputed, the rest kept
    fs.pipe(f"{BUCKET}/damaged/units/u-00000000.json", b"not json")
    kept = fs.info(f"{BUCKET}/damaged/logits/logprobs/c/2/0/0")["LastModified"]
    p = pikv_subprocess(_args(llama_teacher, corpus, url, n=12, extra=["--repair"]), env=s3)
    assert p.returncode == 0 and "2 damaged units" in p.stdout and "verify passed" in p.stdout, p.stdout + p.stderr
    assert open_cache(url).attrs.complete and fs.info(f"{BUCKET}/damaged/logits/logprobs/c/2/0/0")["LastModified"] == kept
    # another host's dump holds the lease, renewed just now: refused, naming it; once lapsed, taken over
    from pikv_offline import lock

    key = ".pikv-dump.lock"
    fs.pipe(f"{BUCKET}/damaged/{key}", json.dumps(
        {"pid": 1, "host": "elsewhere", "token": "x", "since": "then", "renewed": time.time()}).encode())
    with pytest.raises(PikvError, match="in use by another dump .*elsewhere"):
        with lock.hold_at(url, key, what=f"--out {url}", by="dump"):
            pass
    fs.pipe(f"{BUCKET}/damaged/{key}", json.dumps(
        {"pid": 1, "host": "elsewhere", "token": "x", "since": "then", "renewed": time.time() - 3600}).encode())
    with lock.hold_at(url, key, what=f"--out {url}", by="dump"):
        assert json.loads(_fs().cat(f"{BUCKET}/damaged/{key}"))["token"] != "x"
    assert not _fs().exists(f"{BUCKET}/damaged/{key}")


def test_bad_urls_are_one_line(s3, llama_teacher, corpus, student_config, tmp_path):
    fs = _fs()
    fs.pipe(f"{BUCKET}/results.csv", b"precious")
    from pikv_offline import storage
    from pikv_offline.config import DumpConfig, TrainConfig
    from pikv_offline.errors import PikvError

    # in this process: what needs no store
    for url, said in ((f"s3://{BUCKET}//c", "empty path segment"), ("memory://c", "memory://")):
        with pytest.raises(PikvError, match=said):
            DumpConfig(teacher="t", data="d", out=url)
    with pytest.raises(PikvError, match="give a local folder"):
        TrainConfig(cache="c", out=f"s3://{BUCKET}/run", student="s", max_steps=1)
    with pytest.raises(PikvError, match="nosuchproto"):
        storage.names("nosuchproto://x/y")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(PikvError, match=r"pip install 'pikv-offline\[cloud\]'"):
            storage.names("gs://bucket/c")
    # through the command line: the one line and the exit code
    cases = [("s3://no-such-bucket-pikv/c", {}, "no-such-bucket-pikv"),
             (f"s3://{BUCKET}/results.csv", {}, "names an object"),
             (f"s3://{BUCKET}/c", {"AWS_ENDPOINT_URL": "notaurl"}, "the object store failed"),
             (f"s3://{BUCKET}/unreachable", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"},
              "the object store failed (EndpointConnectionError")]  # said to be down, not a damaged cache
    for url, env, said in cases:
        cmd = ["verify", url] if "unreachable" in url else _args(llama_teacher, corpus, url, n=4)
        p = pikv_subprocess(cmd, env={**s3, **env})
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and said in lines[-1] and "Traceback" not in p.stderr, (url, p.stderr[-2000:])
    assert fs.cat(f"{BUCKET}/results.csv") == b"precious"
    assert DumpConfig(teacher="t", data="d", out=f"s3://{BUCKET}/slash/").out == f"s3://{BUCKET}/slash"


def test_training_from_s3_equals_training_from_local(s3, remote_cache, local_cache, student_config, tmp_path):
    """The loader's forked worker opens its own connection; the losses are those of the local cache."""
    url = remote_cache
    common = ["--student-config", student_config, "--max-steps", "3", "--batch-size", "2", "--seed", "3",
              "--num-workers", "1", "--eval-fraction", "0.25", "--log-every", "1"]
    runs = {}
    for name, cache in (("local", local_cache), ("s3", url)):
        p = pikv_subprocess(["train-student", "--cache", cache, "--out", str(tmp_path / name), *common], env=s3)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    keys = ("step", "loss", "ce", "grad_norm", "eval_ce", "eval_kd")
    losses = {name: [tuple(r.get(k) for k in keys) for r in rows] for name, rows in runs.items()}
    assert sum(r[1] is not None for r in losses["local"]) == 3 and losses["s3"] == losses["local"]
