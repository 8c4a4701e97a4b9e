"""The `pikv` command line: click commands that build a config and call the stage's run().

    pikv dump-teacher --teacher DIR --data corpus.jsonl --out CACHE
    pikv inspect CACHE [--json]
    pikv verify CACHE [--recompute N --teacher DIR [--student DIR]]
    pikv train-student --cache CACHE --student-config student.json --out RUN --max-steps 200
    pikv sweep --cache CACHE --student-config student.json --out SWEEP --grid temperature=1,2 --max-steps 200
    pikv eval --cache CACHE --student RUN/final
    pikv make-student --teacher DIR --keep-layers 0,2 --out STUDENT
"""

from __future__ import annotations

import json
import sys

import click

from ..dist import env_rank
from ..errors import PikvError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Offline knowledge distillation: dump a teacher once, train many students from the cache."""


@cli.command("dump-teacher")
@click.option("--teacher", required=True, help="Teacher: a local HF folder or a hub id.")
@click.option("--data", required=True, help="Local file/folder (jsonl, json, parquet, txt, csv, arrow) or a datasets hub name.")
@click.option("--out", required=True, help="Cache folder to create (or resume).")
@click.option("--text-field", default=None, help="Column holding plain text [default: text].")
@click.option("--chat-field", default=None, help="Column holding chat turns [{role, content}]; loss on assistant tokens only.")
@click.option("--split", default="train", show_default=True)
@click.option("--data-config", default=None, help="Config name of a hub dataset.")
@click.option("--seq-len", default=1024, show_default=True, type=int)
@click.option("--no-pack", is_flag=True, help="One document per sequence (split, padded) instead of packing.")
@click.option("--max-sequences", default=None, type=int, help="Dump only the first N sequences.")
@click.option("--top-k", default=64, show_default=True, type=int, help="Exact teacher ids per position (0: none, with --sampled-tail).")
@click.option("--sampled-tail", default=0, show_default=True, type=int,
              help="Also draw N ids per position from the teacher outside the top-k (an unbiased tail estimate for KD).")
@click.option("--encoding", default="fp16", show_default=True, type=click.Choice(["fp16", "bf16"]),
              help="Log-prob storage: fp16 (rel. error 2^-11) or the compact bf16 (2^-8, ~1/3 fewer bytes).")
@click.option("--temperatures", default="1,2,4", show_default=True,
              help="Grid of temperatures whose full-vocabulary normalizer is stored (T=1 is always included, first).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "fp32"]))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--device-map", default=None, type=click.Choice(["auto"]),
              help="Spread a teacher too large for one GPU over all visible GPUs (one process, accelerate).")
@click.option("--shard-size", "shard_seqs", default=64, show_default=True, type=int,
              help="Sequences per zarr shard file (the unit of writing and of resume).")
@click.option("--targets", "targets", multiple=True, metavar="KIND[:LAYERS][@ENC]",
              help="Also store hidden:L,.. (hidden states after layers), kv:L,.. (cached keys/values), router "
                   "(MoE router logits), experts:L,.. (MoE block outputs); @fp16|bf16|int8 [default bf16]. Repeatable.")
@click.option("--max-cache-gb", default=None, type=float,
              help="Refuse a dump whose estimated size exceeds this [default: the free disk at --out].")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache of different inputs.")
def dump_teacher(no_pack, temperatures, targets, **kw):
    """Run the teacher over the data and write top-k log-probs (+ a sampled tail, + rich targets) to a Zarr cache."""
    from ..config import DumpConfig, parse_targets, parse_temperatures
    from ..teacher.dump import run

    run(DumpConfig(pack=not no_pack, temperatures=parse_temperatures(temperatures), targets=parse_targets(targets),
                   **kw))


@cli.command("inspect")
@click.argument("cache_dir")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(cache_dir, as_json):
    """Describe a cache: teacher, data, seq_len, k, temperatures, counts, completeness, bytes/token."""
    from ..cache.reader import describe

    info = describe(cache_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    t, lg = info["teacher"], info["targets"]["logits"]
    click.echo(f"cache        {info['path']}  (format v{info['format_version']}, "
               f"{'complete' if info['complete'] else 'INCOMPLETE'}, key {info['cache_key']})")
    click.echo(f"teacher      {t['name']}  ({t['model_type']}, {t['num_layers']} layers, vocab {t['vocab_size']}, {t['dtype']})")
    click.echo(f"data         {info['data']['data']}  (seq_len {info['seq_len']}, "
               f"{'packed' if info['data']['pack'] else 'unpacked'})")
    click.echo(f"logits       top-k {lg['top_k']}, sampled tail {lg.get('sampled_tail', 0)}, temperatures "
               f"{lg['temperatures']}, encoding {lg['encoding']}, ids {lg['id_dtype']}")
    c = info["counts"]
    click.echo(f"counts       {c['committed']}/{c['sequences']} sequences committed over {info['world_size']} shard(s), "
               f"{c['positions']} positions, {c.get('loss_tokens', '?')} loss tokens")
    from ..cache.format import RICH_KINDS

    for kind in RICH_KINDS:
        t = info["targets"].get(kind)
        if t:
            click.echo(f"{kind:12} layers {t['layers']}, shape {t['shape']}, encoding {t['encoding']}"
                       + (f" (scale per {t['group']} channels)" if t["encoding"] == "int8" else ""))
    click.echo("bytes/token  " + ", ".join(f"{k} {v}" for k, v in info["bytes_per_token_by_target"].items())
               + f"  (total {info['bytes_per_token_total']})")
    for name, e in info["encoding_errors"].items():
        click.echo(f"  {name:26} max abs error {e['max_abs_error']:.3g}, max error / absmax "
                   f"{e['max_error_over_absmax']:.3g}, relative RMS error {e['relative_rms_error']:.3g}")


@cli.command("verify")
@click.argument("cache_dir")
@click.option("--recompute", default=0, show_default=True, type=int,
              help="Re-run the teacher on the first N sequences and measure the cache's fidelity per loss mode and T.")
@click.option("--teacher", default=None, help="The teacher that wrote the cache (for --recompute).")
@click.option("--student", default=None, help="A student folder: adds the gradient angle of each mode vs full KD.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_cmd(cache_dir, as_json, **kw):
    """Read every chunk and check a cache end to end; exits non-zero naming the first bad shard."""
    from ..cache.verify import VerifyConfig, run

    res = run(VerifyConfig(cache=cache_dir, **kw))
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"ok: {res['path']} (format v{res['format_version']}, {res['shards']} shard(s), {res['sequences']} "
               f"sequences, {res['loss_tokens']} loss tokens; arrays {', '.join(res['arrays'])})")
    rc = res.get("recompute")
    if rc:
        click.echo(f"fidelity vs the live teacher on {rc['sequences']} sequences ({rc['positions']} positions):")
        click.echo(f"{'mode':8} {'T':>4} {'max logprob err':>16} {'KL(teacher||cache)':>19}"
                   + (f" {'grad angle vs full KD':>22}" if rc["student"] else ""))
        for r in rc["rows"]:
            click.echo(f"{r['mode']:8} {r['T']:>4g} {r['max_logprob_err']:>16.2e} {r['kl']:>19.2e}"
                       + (f" {r['angle_deg']:>21.2f}°" if "angle_deg" in r else ""))
        for r in rc["rich"]:
            click.echo(f"{r['array']:26} {r['encoding']:5} max error / absmax vs live {r['max_error_over_absmax']:.2e} "
                       f"(bound {r['bound']:.2e}), relative RMS error {r['relative_rms_error']:.2e}")


TRAIN_OPTIONS = [
    click.option("--cache", required=True, help="Teacher cache written by `pikv dump-teacher`."),
    click.option("--student", default=None, help="Student: a HF model folder or hub id (fine-tuned from its weights)."),
    click.option("--student-config", default=None, help="Student: a config json (fresh init with AutoConfig.for_model)."),
    click.option("--kd-weight", default=1.0, show_default=True, type=float),
    click.option("--ce-weight", default=0.0, show_default=True, type=float),
    click.option("--temperature", default=1.0, show_default=True, type=float),
    click.option("--divergence", default="forward_kl", show_default=True,
                  type=click.Choice(["forward_kl", "reverse_kl", "jsd"])),
    click.option("--tail", default="auto", show_default=True, type=click.Choice(["auto", "bucket", "renorm", "sampled"]),
                  help="Teacher mass outside the top-k: one bucket, renormalize it away, or the sampled tail's "
                       "unbiased estimate. auto: sampled when the cache holds a sampled tail, else bucket."),
    click.option("--top-k", default=None, type=int, help="Use only the first N cached ids (<= cached k)."),
    click.option("--batch-size", default=8, show_default=True, type=int, help="Sequences per micro-batch per rank."),
    click.option("--grad-accum", default=1, show_default=True, type=int),
    click.option("--lr", default=3e-4, show_default=True, type=float),
    click.option("--schedule", default="cosine", show_default=True, type=click.Choice(["cosine", "wsd", "constant"])),
    click.option("--warmup-steps", default=0, show_default=True, type=int),
    click.option("--min-lr-ratio", default=0.1, show_default=True, type=float),
    click.option("--decay-fraction", default=0.2, show_default=True, type=float, help="WSD: share of steps spent decaying."),
    click.option("--weight-decay", default=0.1, show_default=True, type=float),
    click.option("--grad-clip", default=1.0, show_default=True, type=float, help="0 disables clipping."),
    click.option("--max-steps", default=None, type=int),
    click.option("--epochs", default=None, type=float),
    click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "fp32"])),
    click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])),
    click.option("--seed", default=0, show_default=True, type=int),
    click.option("--save-every", default=0, show_default=True, type=int, help="Checkpoint every N steps (0: only at the end)."),
    click.option("--eval-every", default=0, show_default=True, type=int, help="Held-out eval every N steps (0: only at the end)."),
    click.option("--eval-fraction", default=0.01, show_default=True, type=float),
    click.option("--log-every", default=10, show_default=True, type=int),
    click.option("--loss-chunk", default=0, show_default=True, type=int,
                  help="Positions per chunk of the LM head + loss (checkpointed); 0 = whole micro-batch."),
    click.option("--num-workers", default=1, show_default=True, type=int, help="DataLoader worker processes (0 or 1)."),
    click.option("--feature-weight", default=0.0, show_default=True, type=float,
                  help="Hidden-state loss (cache --targets hidden) after a learned student->teacher projection."),
    click.option("--kv-weight", default=0.0, show_default=True, type=float, help="Key/value loss (cache --targets kv)."),
    click.option("--router-weight", default=0.0, show_default=True, type=float,
                  help="KL to the teacher's router per MoE layer (cache --targets router; MoE student, same expert count)."),
    click.option("--expert-weight", default=0.0, show_default=True, type=float,
                  help="MoE block output loss (cache --targets experts) against the student's MoE/MLP block."),
    click.option("--feature-loss", default="mse", show_default=True, type=click.Choice(["mse", "cosine"]),
                  help="Loss of the hidden, kv and expert targets."),
    click.option("--layer-map", default=None,
                  help="Teacher:student layer pairs, e.g. 4:2,8:4 [default: each cached layer to the student layer "
                       "at the same relative depth]."),
    click.option("--freeze", multiple=True, help="Freeze mlp, embeddings (with a tied head: the head too) or "
                                                 "layers:0,2. Repeatable."),
    click.option("--tensorboard", is_flag=True),
    click.option("--wandb", is_flag=True),
    click.option("--zero", is_flag=True, help="Shard optimizer state over ranks (ZeroRedundancyOptimizer)."),
]


def train_options(f):
    """The train-student flags (all but --out and --resume), shared by train-student and sweep."""
    for option in reversed(TRAIN_OPTIONS):
        f = option(f)
    return f


@cli.command("train-student")
@train_options
@click.option("--out", required=True, help="Run folder: checkpoints, final/, metrics.jsonl.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
def train_student(**kw):
    """Train a student from the cache (KD on top-k + tail, optional CE); the teacher is never loaded."""
    from ..config import TrainConfig
    from ..student.train import run

    run(TrainConfig(**kw))


@cli.command("sweep")
@train_options
@click.option("--out", required=True, help="Sweep folder: one run folder per grid point, results.csv, results.png.")
@click.option("--grid", "grid", multiple=True, required=True,
              help="flag=v1,v2,... over a train-student flag, e.g. --grid temperature=1,2,4; repeat for a cross product.")
def sweep_cmd(out, grid, **kw):
    """Train one student per point of a grid of train-student settings, all from the same cache."""
    from ..student.sweep import SweepConfig, parse_grid, run

    run(SweepConfig(out=out, grid=parse_grid(grid), base=kw))


@cli.command("make-student")
@click.option("--teacher", required=True, help="Teacher: a local HF folder or a hub id.")
@click.option("--keep-layers", required=True, help="Teacher layers to copy, in order, e.g. 0,2,4,6.")
@click.option("--out", required=True, help="Folder for the student (weights, config, tokenizer).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
def make_student_cmd(**kw):
    """Write a student that copies some teacher layers plus its embeddings, final norm and head."""
    from ..student.make import MakeStudentConfig, run

    run(MakeStudentConfig(**kw))


@cli.command("eval")
@click.option("--cache", required=True)
@click.option("--student", required=True, help="A student folder, e.g. RUN/final or RUN/checkpoint-N.")
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--divergence", default="forward_kl", show_default=True,
              type=click.Choice(["forward_kl", "reverse_kl", "jsd"]))
@click.option("--tail", default="auto", show_default=True, type=click.Choice(["auto", "bucket", "renorm", "sampled"]),
              help="auto: sampled when the cache holds a sampled tail, else bucket.")
@click.option("--top-k", default=None, type=int)
@click.option("--eval-fraction", default=0.01, show_default=True, type=float,
              help="The held-out share train-student used; 1 evaluates on every sequence (a held-out cache).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(as_json, **kw):
    """Held-out CE, perplexity, KD loss and top-1 agreement of a student against the cache."""
    from ..student.evaluate import run

    res = run(**kw)
    click.echo(json.dumps(res) if as_json else "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                            for k, v in res.items()))


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except PikvError as e:
        if env_rank() == 0:
            click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
