"""`pikv sweep`: one run per grid point from one cache, results.csv + plot, finished runs skipped."""

from __future__ import annotations

import csv
import os
import shutil

import pytest

from pikv_offline.config import SweepConfig, parse_grid
from pikv_offline.errors import PikvError
from pikv_offline.tools import sweep as S


def base(cache, student_config, **kw):
    b = dict(cache=cache, student_config=student_config, max_steps=2, batch_size=4, lr=3e-3, eval_fraction=0.1,
             num_workers=0, log_every=1, ce_weight=0.5)
    b.update(kw)
    return b


def test_sweep_runs_the_grid_and_resumes(train_cache, student_config, tmp_path, monkeypatch):
    cfg = SweepConfig(out=str(tmp_path / "sw"), grid=parse_grid(["temperature=1,2", "top-k=4,16"]),
                        base=base(train_cache, student_config))
    rows = S.run(cfg)
    assert [r["run"] for r in rows] == ["temperature=1_top-k=4", "temperature=1_top-k=16",
                                        "temperature=2_top-k=4", "temperature=2_top-k=16"]
    with open(tmp_path / "sw" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and all(float(r["eval_ce"]) > 0 for r in table)
    assert {r["temperature"] for r in table} == {"1.0", "2.0"}
    assert os.path.getsize(tmp_path / "sw" / "results.png") > 1000
    # One run lost its final/ (as if killed after its checkpoint): only it trains again, resuming.
    shutil.rmtree(tmp_path / "sw" / "temperature=2_top-k=4" / "final")
    trained = []
    real = S.train

    def spy(tcfg, d):
        trained.append((os.path.basename(tcfg.out), tcfg.resume))
        return real(tcfg, d)

    monkeypatch.setattr(S, "train", spy)
    rows2 = S.run(cfg)
    assert trained == [("temperature=2_top-k=4", "strict")]
    assert [r["eval_ce"] for r in rows2] == pytest.approx([r["eval_ce"] for r in rows])
    # the same --out with other settings: the finished runs are not reported as if they were the new ones
    other = SweepConfig(out=str(tmp_path / "sw"), grid=parse_grid(["temperature=1,2", "top-k=4,16"]),
                        base=base(train_cache, student_config, lr=1e-3))
    with pytest.raises(PikvError, match="finished run .* had another --lr: 0.003, this sweep asks for 0.001"):
        S.run(other)
    # ... but settings of how a run goes (workers, logging) and another spelling of the cache are the same runs
    same = SweepConfig(out=str(tmp_path / "sw"), grid=parse_grid(["temperature=1,2", "top-k=4,16"]),
                       base=base(os.path.abspath(train_cache) + "/", student_config, num_workers=1, log_every=7))
    assert [r["eval_ce"] for r in S.run(same)] == pytest.approx([r["eval_ce"] for r in rows])


@pytest.mark.parametrize("spec, message", [
    (["temperature"], "write it as flag=v1,v2"),
    (["nonsense=1,2"], "not a train-student setting"),
    (["out=a,b"], "not a train-student setting"),
    (["lr=0.1,fast"], "not a valid"),
    (["lr=1", "lr=2"], "twice"),
    ([], "at least one --grid"),
])
def test_bad_grid(spec, message):
    with pytest.raises(PikvError, match=message):
        parse_grid(spec)


def test_bad_grid_value_fails_before_training(train_cache, student_config, tmp_path):
    cfg = SweepConfig(out=str(tmp_path / "sw"), grid=parse_grid(["temperature=1,-1"]),
                        base=base(train_cache, student_config))
    with pytest.raises(PikvError, match="--temperature must be a positive"):
        S.run(cfg)
    assert not os.path.exists(tmp_path / "sw")
    cfg = SweepConfig(out=str(tmp_path / "sw"), grid=parse_grid(["temperature=1,3"]),  # the cache's grid is 1, 2
                      base=base(train_cache, student_config))
    with pytest.raises(PikvError, match="sweep run temperature=3.*not in the cache's grid"):
        S.run(cfg)
    assert not os.path.exists(tmp_path / "sw")
