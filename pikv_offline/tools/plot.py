"""Plots of training runs: the next-token CE curve of every run and each run's held-out CE."""

from __future__ import annotations

import json
import os


def read_metrics(run_dir: str) -> tuple[list[dict], dict]:
    """(per-step records, last eval record) of a run's metrics.jsonl."""
    steps, last_eval = [], {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        for line in open(path):
            r = json.loads(line)
            if "eval_ce" in r:
                last_eval = r
            elif "loss" in r:
                steps.append(r)
    return steps, last_eval


def mean_tokens_per_s(steps: list[dict]) -> float | None:
    """Mean logged training tokens/s, leaving out the first record (it includes start-up)."""
    speeds = [r["tokens_per_s"] for r in steps if "tokens_per_s" in r][1:]
    return sum(speeds) / len(speeds) if speeds else None


def plot_runs(runs: dict[str, str], out_png: str, title: str = "") -> str:
    """runs: label -> run folder. Left: training CE on the next token (logged for every run, whatever
    its loss weights, so the curves compare); right: held-out CE at the end of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    labels, finals = [], []
    for label, run_dir in runs.items():
        steps, ev = read_metrics(run_dir)
        if steps:
            left.plot([r["step"] for r in steps], [r["ce"] for r in steps], label=label, linewidth=1.2)
        if ev:
            labels.append(label)
            finals.append(ev["eval_ce"])
    left.set_xlabel("step")
    left.set_ylabel("training next-token CE (nats/token)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.barh(range(len(finals)), finals, color="tab:blue")
    right.set_yticks(range(len(finals)), labels, fontsize=8)
    right.invert_yaxis()
    if finals:
        lo, hi = min(finals), max(finals)
        right.set_xlim(lo - 0.1 * (hi - lo + 0.1), hi + 0.1 * (hi - lo + 0.1))
        for i, v in enumerate(finals):
            right.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    right.set_xlabel("held-out CE (nats/token)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
