"""The `pikv` command line: click commands that build a config and call the stage's run().

    pikv dump-teacher --teacher DIR --data corpus.jsonl --out CACHE
    pikv inspect CACHE [--json]
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
@click.option("--top-k", default=64, show_default=True, type=int)
@click.option("--temperatures", default="1,2,4", show_default=True,
              help="Grid of temperatures whose full-vocabulary LSE is stored (T=1 is always included, first).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "fp32"]))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--device-map", default=None, type=click.Choice(["auto"]),
              help="Spread a teacher too large for one GPU over all visible GPUs (one process, accelerate).")
@click.option("--shard-size", "shard_seqs", default=64, show_default=True, type=int,
              help="Sequences per zarr shard file (the unit of writing and of resume).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache of different inputs.")
def dump_teacher(no_pack, temperatures, **kw):
    """Run the teacher over the data and write top-k log-probs + LSE to a Zarr cache."""
    from ..config import DumpConfig, parse_temperatures
    from ..teacher.dump import run

    run(DumpConfig(pack=not no_pack, temperatures=parse_temperatures(temperatures), **kw))


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
    click.echo(f"logits       top-k {lg['top_k']}, temperatures {lg['temperatures']}, "
               f"log-probs {lg['logprob_encoding']}, ids {lg['id_dtype']}")
    c = info["counts"]
    click.echo(f"counts       {c['committed']}/{c['sequences']} sequences committed over {info['world_size']} shard(s), "
               f"{c['positions']} positions, {c.get('loss_tokens', '?')} loss tokens")
    click.echo("bytes/token  " + ", ".join(f"{k} {v}" for k, v in info["bytes_per_token"].items())
               + f"  (total {info['bytes_per_token_total']})")


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
