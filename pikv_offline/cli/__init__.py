"""The `pikv` command line: click commands that build a config and call its run().

    pikv dump-teacher --teacher DIR --data corpus.jsonl --out CACHE
    pikv inspect CACHE [--json]
    pikv verify CACHE [--recompute N --teacher DIR [--student DIR]]
    pikv train-student --cache CACHE --student-config student.json --out RUN --max-steps 200
    pikv sweep --cache CACHE --student-config student.json --out SWEEP --grid temperature=1,2 --max-steps 200
    pikv eval --cache CACHE --student RUN/final
    pikv make-student --teacher DIR --keep-layers 0,2 --out STUDENT

Every option comes from a field of the command's config dataclass in config.py (its name, type,
default, choices and help), so a setting is declared once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import types
import typing

import click

from .. import config as C
from ..cache.format import RICH_KINDS
from ..dist import env_rank
from ..errors import PikvError


def _params(cls, skip: tuple[str, ...] = ()) -> list:
    """click parameters for the fields of a config dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        if f.name in skip or not m.get("cli", True):
            continue
        required = f.default is dataclasses.MISSING
        if m.get("argument"):
            params.append(click.Argument([f.name], metavar=m.get("metavar")))
            continue
        kind = hints[f.name]
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in args if a is not type(None))
        flag = m.get("flag") or "--" + f.name.replace("_", "-")
        kw = {"help": m.get("help") or None, "metavar": m.get("metavar")}
        if kind is bool:
            # a --no-X flag stores False; every other bool flag stores True
            kw.update(is_flag=True, flag_value=not flag.startswith("--no-"), default=f.default)
        elif kind is tuple:  # a repeatable flag
            kw.update(multiple=True, required=required)
        elif m.get("parse") is not None:  # one text, parsed into the value (e.g. '1,2,4')
            kw["required"] = required
            if m.get("show"):
                kw["help"] = f"{kw['help']}  [default: {m['show']}]"
        else:
            kw["type"] = click.Choice(m["choices"]) if m.get("choices") else kind
            kw["required"] = required
            if m.get("flag_value") is not None:  # usable alone (--resume) or with a value (--resume auto)
                kw.update(is_flag=False, flag_value=m["flag_value"])
            if not required:  # click >= 8.3 takes an explicit default=None as given: a required one has none
                kw.update(default=f.default, show_default=f.default is not None)
        option = click.Option([flag, f.name], **kw)
        option.pikv_joined = m.get("parse") is not None and kind is not tuple  # one text such as '1,2,4'
        option.pikv_flag_value = m.get("flag_value")  # the value of the option given alone (--resume)
        params.append(option)
    return params


def options(cls, skip: tuple[str, ...] = ()):
    """Decorator: the command takes the fields of ``cls`` (but ``skip``) as its parameters, and --config FILE."""
    def deco(f):
        config = click.Option(["--config"], metavar="FILE", is_eager=True, expose_value=False, callback=_read_configs,
                              multiple=True, help="A YAML or JSON file of settings: its keys are this command's flag "
                                                  "names (top-k or top_k); flags on the command line override it, a "
                                                  "later --config an earlier one.")
        have = getattr(f, "__click_params__", [])
        once = [] if any(p.name == "config" for p in have) else [config]  # a command of two configs (sweep)
        f.__click_params__ = have + list(reversed(_params(cls, skip))) + once
        return f
    return deco


MAX_CONFIG_BYTES = 1 << 20


def _read_configs(ctx: click.Context, param, paths: tuple[str, ...]) -> None:
    for path in paths:
        _read_config(ctx, path)


def yaml_loader():
    """PyYAML's safe loader with YAML 1.2's numbers (which read JSON too): YAML 1.1 reads 4:1 as the base-60
    integer 241 (a temperature schedule) and 1e-3 as a string; here they are the string '4:1' and 0.001."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    numbers = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in rules if tag not in numbers]
                                      for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(numbers[0], re.compile(
        r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F][0-9a-fA-F_]*|0o[0-7][0-7_]*)$"), list("-+0123456789"))

    def integer(loader, node):  # YAML 1.2: 010 is ten (1.1: eight), 0o10 eight, 0x10 sixteen
        text = loader.construct_scalar(node).replace("_", "")
        return int(text[2:], 16) if text.startswith("0x") else int(text[2:], 8) if text.startswith("0o") else \
            int(text, 10)

    Loader.add_constructor(numbers[0], integer)
    Loader.add_implicit_resolver(numbers[1], re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return Loader


def _read_config(ctx: click.Context, path: str) -> None:
    """--config FILE: its settings become the command's defaults (click's default_map), so a flag given on
    the command line wins. Read before any other option (eager). Each value must be of its flag's kind."""
    import yaml

    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise PikvError(f"--config {path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a settings file is a few lines")
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=yaml_loader())
    except OSError as e:
        raise PikvError(f"--config {path}: cannot read it ({e.strerror})")
    except UnicodeDecodeError as e:
        raise PikvError(f"--config {path}: not UTF-8 text (byte {e.start}); give a YAML or JSON file")
    except (yaml.YAMLError, RecursionError) as e:
        raise PikvError(f"--config {path}: not valid YAML or JSON ({' '.join(str(e).split())[:200]})")
    if data is None:
        return
    if not isinstance(data, dict):
        raise PikvError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    names = {}  # key as written (flag or field name, dashes or underscores) -> (parameter, value of a --no-X flag)
    shown = set()  # the keys an error lists: the flags, and the arguments' names
    for p in ctx.command.params:
        if p.name == "config" or not p.name:
            continue
        names[p.name] = names[p.name.replace("_", "-")] = (p, None)
        if isinstance(p, click.Argument):
            shown.add(p.name)
        for opt in getattr(p, "opts", []):
            if opt.startswith("--"):
                shown.add(opt[2:])
                negated = isinstance(p, click.Option) and p.is_flag and opt.startswith("--no-")
                names[opt[2:]] = names[opt[2:].replace("-", "_")] = (p, negated or None)
    defaults = {}
    for key, value in data.items():
        found = names.get(str(key).lstrip("-"))
        if found is None:
            flags = ", ".join(sorted(shown))
            raise PikvError(f"--config {path}: {key!r} is not a setting of `pikv {ctx.command.name}`; its keys: {flags}")
        p, negated = found
        defaults[p.name] = _config_value(path, key, value, p, negated)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def given(cls, values: dict) -> dict:
    """Parsed parameters -> config fields: a ``parse`` field's text goes through its parser; an option
    not given is left out, so the dataclass default applies."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for name, v in values.items():
        parse = fields[name].metadata.get("parse")
        if v is None or v == ():
            continue
        kw[name] = parse(v) if parse is not None else v
    return kw


def build(cls, values: dict):
    return cls(**given(cls, values))


def _config_value(path: str, key, value, p, negated):
    """A --config value as click takes it for parameter ``p``, or one line saying what is wrong."""
    def bad(what: str) -> PikvError:
        return PikvError(f"--config {path}: {key} takes {what}, got {value!r}")

    def scalar(v) -> bool:
        return isinstance(v, (str, int, float)) and not isinstance(v, bool)

    if value is None:
        raise bad("a value (leave the key out for the default)")
    if negated or (isinstance(p, click.Option) and p.is_flag):
        if not isinstance(value, bool):
            raise bad("true or false")
        return not value if negated else value
    if value is True and getattr(p, "pikv_flag_value", None) is not None:
        return p.pikv_flag_value  # e.g. resume: true, as --resume alone
    if getattr(p, "multiple", False):
        values = value if isinstance(value, list) else [value]
        if not all(scalar(v) for v in values):
            raise bad("a value or a list of values")
        return [str(v) for v in values]
    if isinstance(value, list) and getattr(p, "pikv_joined", False):
        if not value or not all(scalar(v) for v in value):
            raise bad("a list of values")
        return ",".join(str(v) for v in value)  # e.g. temperatures: [1, 2, 4]
    kind = p.type
    if isinstance(kind, click.types.IntParamType):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
    elif isinstance(kind, click.types.FloatParamType):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad("a number")
    elif not isinstance(value, str) and not (scalar(value) and getattr(p, "pikv_joined", False)):
        raise bad("one text value")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Offline knowledge distillation: dump a teacher once, train many students from the cache."""


@cli.command("dump-teacher")
@options(C.DumpConfig)
def dump_teacher(**kw):
    """Run the teacher over the data and write top-k log-probs (+ a sampled tail, + rich targets) to a Zarr cache."""
    from ..teacher.dump import run

    run(build(C.DumpConfig, kw))


ERROR_LABELS = {"max_abs_error": "max abs error", "max_error_over_absmax": "max error / absmax",
                "relative_rms_error": "relative RMS error"}


@cli.command("inspect")
@options(C.InspectConfig)
def inspect_cmd(**kw):
    """Describe a cache: teacher, data, seq_len, k, temperatures, counts, completeness, bytes/token."""
    from ..cache.reader import describe

    cfg = build(C.InspectConfig, kw)
    info = describe(cfg.cache)
    if cfg.as_json:
        click.echo(json.dumps(info, indent=2))
        return
    t, lg, data = info["teacher"], info["targets"]["logits"], info["data"]
    t = {k: t.get(k, "?") for k in ("name", "model_type", "num_layers", "vocab_size", "dtype")}  # display only
    click.echo(f"cache        {info['path']}  (format v{info['format_version']}, "
               f"{'complete' if info['complete'] else 'INCOMPLETE'}, key {info['cache_key']})")
    click.echo(f"teacher      {t['name']}  ({t['model_type']}, {t['num_layers']} layers, vocab {t['vocab_size']}, {t['dtype']})")
    click.echo(f"data         {data.get('data', '?')}  (seq_len {info['seq_len']}, "
               f"{'packed' if data.get('pack', True) else 'unpacked'})")
    drawn = f" drawn at T={','.join(f'{t:g}' for t in lg['tail_temperatures'])}" if lg.get("sampled_tail") else ""
    click.echo(f"logits       top-k {lg['top_k']}, sampled tail {lg.get('sampled_tail', 0)}{drawn}, temperatures "
               f"{lg['temperatures']}, encoding {lg['encoding']}, ids {lg['id_dtype']}")
    c = info["counts"]
    click.echo(f"counts       {c['committed']}/{c['sequences']} sequences committed ({c['committed_units']}/{c['units']} "
               f"units of {info['unit_seqs']}), "
               f"{c['positions']} positions, {c.get('loss_tokens', '?')} loss tokens")
    for kind in RICH_KINDS:
        t = info["targets"].get(kind)
        if t:
            click.echo(f"{kind:12} layers {t['layers']}, shape {t['shape']}, encoding {t['encoding']}"
                       + (f" (scale per {t['group']} channels)" if t["encoding"] == "int8" else ""))
    click.echo("bytes/token  " + ", ".join(f"{k} {v}" for k, v in info["bytes_per_token_by_target"].items())
               + f"  (total {info['bytes_per_token_total']})")
    for name, e in info["encoding_errors"].items():
        click.echo(f"  {name:26} " + ", ".join(f"{ERROR_LABELS.get(k, k)} {v:.3g}" for k, v in e.items()))


@cli.command("verify")
@options(C.VerifyConfig)
def verify_cmd(**kw):
    """Read every chunk and check a cache end to end; exits non-zero naming the first bad unit."""
    from ..tools.fidelity import run

    cfg = build(C.VerifyConfig, kw)
    res = run(cfg)
    if cfg.as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"ok: {res['path']} (format v{res['format_version']}, {res['units']} unit(s), {res['sequences']} "
               f"sequences, {res['loss_tokens']} loss tokens; arrays {', '.join(res['arrays'])})")
    rc = res.get("recompute")
    if rc:
        click.echo(f"fidelity vs the live teacher on {rc['sequences']} sequences ({rc['positions']} positions):")
        click.echo(f"{'mode':8} {'T':>4} {'max logprob err':>16} {'KL(teacher||cache)':>19}"
                   + (f" {'grad angle vs full KD':>22}" if rc["student"] else ""))
        for r in rc["rows"]:
            click.echo(f"{r['mode']:8} {r['T']:>4g} {r['max_logprob_err']:>16.2e} {r['kl']:>19.2e}"
                       + (f" {r['angle_deg']:>21.2f}°" if "angle_deg" in r else ""))
        if rc.get("tail_draws_equal") is not None:
            click.echo(f"tail draws equal to the live teacher's redraw at {100 * rc['tail_draws_equal']:.1f}% of "
                       "the positions")
        for r in rc["rich"]:
            click.echo(f"{r['array']:26} {r['encoding']:5} max error / absmax vs live {r['max_error_over_absmax']:.2e} "
                       f"(bound {r['bound']:.2e}), relative RMS error {r['relative_rms_error']:.2e}")


@cli.command("train-student")
@options(C.TrainConfig)
def train_student(**kw):
    """Train a student from the cache (KD on top-k + tail, optional CE); the teacher is never loaded."""
    from ..student.train import run

    run(build(C.TrainConfig, kw))


@cli.command("sweep")
@options(C.TrainConfig, skip=("out", "resume"))
@options(C.SweepConfig)
def sweep_cmd(out, grid, **kw):
    """Train one student per point of a grid of train-student settings, all from the same cache."""
    from ..tools.sweep import run

    run(C.SweepConfig(out=out, grid=C.parse_grid(grid), base=given(C.TrainConfig, kw)))


@cli.command("make-student")
@options(C.MakeStudentConfig)
def make_student_cmd(**kw):
    """Write a student that copies some teacher layers plus its embeddings, final norm and head."""
    from ..tools.make_student import run

    run(build(C.MakeStudentConfig, kw))


@cli.command("eval")
@options(C.EvalConfig)
def eval_cmd(**kw):
    """Held-out CE, perplexity, KD loss and top-1 agreement of a student against the cache."""
    from ..student.evaluate import run

    cfg = build(C.EvalConfig, kw)
    res = run(cfg)
    if env_rank() == 0:  # every rank computes the same figures; one prints them
        click.echo(json.dumps(res) if cfg.as_json else "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else
                                                                    f"{k} {v}" for k, v in res.items()))


def main() -> None:
    # zarr reads a unit's chunks as concurrent asyncio tasks: when a damaged chunk fails, its siblings' failures
    # are logged at exit as "Task exception was never retrieved" with tracebacks, after the one line said.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        cli.main(standalone_mode=False)
    except PikvError as e:
        _say(str(e))
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:  # an object store that cannot be reached or refuses: one line too; anything else is a bug
        from ..storage import remote_failure

        said = remote_failure(e)
        if said is None:
            raise
        _say(said)


def _say(error: str) -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # a bar left open: the error starts on its own line
        bar.close()
    # Every rank says it: an error only rank 1 met (its disk, its shard) must not vanish with rank 0's.
    click.echo(f"error: {error}" if env_rank() == 0 else f"error (rank {env_rank()}): {error}", err=True)
    sys.exit(2)
