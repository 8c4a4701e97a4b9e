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


def plot_runs(runs: dict[str, str], out_png: str, title: str = "", heldout: dict[str, float] | None = None,
              bytes_per_token: dict[str, float] | None = None) -> str:
    """runs: label -> run folder. Left: training CE on the next token (logged for every run, whatever
    its loss weights, so the curves compare). Right: each run's held-out CE (``heldout``, default its
    own last eval), as bars, or with ``bytes_per_token`` (label -> the teacher targets' bytes/token it
    trained from) against those bytes; a run without bytes is drawn as a line (a baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    finals = {}
    for label, run_dir in runs.items():
        steps, ev = read_metrics(run_dir)
        if steps:
            left.plot([r["step"] for r in steps], [r["ce"] for r in steps], label=label, linewidth=1.2)
        if heldout is not None and label in heldout:
            finals[label] = heldout[label]
        elif ev:
            finals[label] = ev["eval_ce"]
    left.set_xlabel("step")
    left.set_ylabel("training next-token CE (nats/token)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    if bytes_per_token is None:
        labels, values = list(finals), list(finals.values())
        right.barh(range(len(values)), values, color="tab:blue")
        right.set_yticks(range(len(values)), labels, fontsize=8)
        right.invert_yaxis()
        if values:
            lo, hi = min(values), max(values)
            right.set_xlim(lo - 0.1 * (hi - lo + 0.1), hi + 0.1 * (hi - lo + 0.1))
            for i, v in enumerate(values):
                right.text(v, i, f" {v:.3f}", va="center", fontsize=8)
        right.set_xlabel("held-out CE (nats/token)")
    else:
        for i, (label, v) in enumerate(finals.items()):
            if label in bytes_per_token:
                right.scatter([bytes_per_token[label]], [v], color=f"C{i}", zorder=3)
                right.annotate(f"{label}\n{v:.3f}", (bytes_per_token[label], v), fontsize=7,
                               textcoords="offset points", xytext=(6, 4))
            else:
                right.axhline(v, color=f"C{i}", linestyle="--", linewidth=1)
                right.text(0, v, f" {label} {v:.3f}", fontsize=7, va="bottom", color=f"C{i}")
        right.set_xlim(-5, max(bytes_per_token.values(), default=1) * 1.6 + 5)
        right.set_xlabel("logit bytes/token stored (online: 0, the teacher runs live)")
        right.set_ylabel("held-out CE (nats/token)")
        right.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
