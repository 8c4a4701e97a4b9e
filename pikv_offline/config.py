"""Frozen, validated configs of every command; the CLI builds its options from them, run(cfg) takes one.

A field's metadata (``opt``) holds its help text, choices and, where they differ from the field,
its flag and how the flag's text is parsed; cli/ turns each field into a click option, so names,
defaults, choices and help have this one source.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import typing
from dataclasses import dataclass

from . import storage
from .cache.format import DEFAULT_TENSOR_ENCODING, ENCODINGS, INT8_KINDS, MAX_TAIL, RICH_KINDS, TENSOR_ENCODINGS
from .errors import PikvError

DTYPES = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
READERS = ("auto", "zarr", "tensorstore")  # what reads a cache's rows in training (cache.reader.open_cache)


def opt(default=dataclasses.MISSING, help: str = "", *, flag: str | None = None, choices=None, parse=None,
        show: str | None = None, argument: bool = False, metavar: str | None = None, cli: bool = True,
        flag_value=None):
    """A config field with what its command-line option needs: ``flag`` (default --field-name; a
    --no-X flag of a bool stores False), ``choices``, ``parse`` (text -> value, for values given as one
    string such as '1,2,4'), ``show`` (the default as a user writes it), ``argument`` (positional),
    ``flag_value`` (the value of the option given without one, e.g. --resume)."""
    meta = {"help": help, "flag": flag, "choices": choices, "parse": parse, "show": show, "argument": argument,
            "metavar": metavar, "cli": cli, "flag_value": flag_value}
    return dataclasses.field(default=default, metadata=meta)


def parse_temperatures(text: str) -> tuple[float, ...]:
    """'1,2,4' -> (1.0, 2.0, 4.0); T=1 always first (it is added when missing), no duplicates."""
    try:
        temps = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise PikvError(f"--temperatures {text!r} is not a comma-separated list of numbers, e.g. 1,2,4")
    if not temps:
        raise PikvError("--temperatures is empty; give a comma-separated list such as 1,2,4")
    bad = [t for t in temps if not (math.isfinite(t) and t > 0)]
    if bad:
        raise PikvError(f"--temperatures must be positive finite numbers; got {bad[0]}")
    if len(set(temps)) != len(temps):
        raise PikvError(f"--temperatures {text!r} repeats a value")
    rest = [t for t in temps if t != 1.0]
    return (1.0, *rest)


def check_cross(cross_loss: str | None, cross: bool, flag: str, divergence: str, tail: str) -> None:
    """--cross-loss takes effect only with cross-tokenizer KD (``cross``, turned on by ``flag``), which compares
    the head and one bucket of the rest: other divergences and tails would be accepted and ignored."""
    if cross_loss is not None and cross_loss not in CROSS_LOSSES:
        raise PikvError(f"--cross-loss must be one of {', '.join(CROSS_LOSSES)}; got {cross_loss!r}")
    if cross_loss is not None and not cross:
        raise PikvError(f"--cross-loss {cross_loss} needs {flag} (cross-tokenizer KD); drop it otherwise")
    if cross and (divergence != "forward_kl" or tail not in ("auto", "bucket")):
        raise PikvError(f"{flag}: cross-tokenizer KD compares the head and one bucket of the rest, as forward KL "
                        f"(match) or sorted L1 (uld); drop --divergence {divergence} / --tail {tail} (forward_kl and "
                        "auto or bucket)")


def parse_teacher_weights(text: str) -> tuple[float, ...]:
    """'0.7,0.3' -> (0.7, 0.3), normalized to sum 1: the mixture weights of several teachers."""
    try:
        w = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PikvError(f"--teacher-weights {text!r} is not a comma-separated list of numbers, e.g. 0.7,0.3")
    if not w or not all(math.isfinite(x) and x > 0 for x in w):
        raise PikvError(f"--teacher-weights {text!r}: give one positive number per --cache, e.g. 0.7,0.3")
    w = [x / max(w) for x in w]  # first to at most 1: a sum of huge weights would overflow to inf
    return tuple(x / sum(w) for x in w)


SCHEDULE_SHAPES = ("linear", "cosine")


# The KD temperatures a run accepts. Outside, exp(lp / T) underflows or every distribution is flat in float32:
# KD is then silently 0, or every step non-finite (the published range is about 0.5 to 20).
T_RANGE = (0.01, 100.0)


def check_temperature(t: float, flag: str) -> None:
    if not (math.isfinite(t) and T_RANGE[0] <= t <= T_RANGE[1]):
        raise PikvError(f"{flag} must be a number from {T_RANGE[0]:g} to {T_RANGE[1]:g} (a KD temperature); got {t:g}")


def parse_temperature_schedule(text: str) -> tuple[float, float, str]:
    """'4:1' or '4:1:cosine' -> (4.0, 1.0, 'cosine'): from T0 at the first step to T1 at the last."""
    parts = text.replace(",", ":").split(":")  # a config file's list arrives comma-joined
    shape = parts.pop() if len(parts) == 3 else "linear"
    try:
        t0, t1 = (float(x) for x in parts)
    except ValueError:
        raise PikvError(f"--temperature-schedule {text!r}: give T0:T1 or T0:T1:linear|cosine, e.g. 4:1")
    if not all(math.isfinite(t) and t > 0 for t in (t0, t1)):
        raise PikvError(f"--temperature-schedule {text!r}: both temperatures must be positive numbers")
    for t in (t0, t1):
        check_temperature(t, f"--temperature-schedule {text!r}: each end")
    if shape not in SCHEDULE_SHAPES:
        raise PikvError(f"--temperature-schedule {text!r}: the shape must be linear or cosine, not {shape!r}")
    return t0, t1, shape


def parse_tail_temperatures(text: str) -> tuple[float, ...]:
    """'1,2,4' -> (1.0, 2.0, 4.0): the sampled tail's slot j draws at the (j mod m)-th; a repeat weights a T."""
    try:
        temps = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise PikvError(f"--tail-temperatures {text!r} is not a comma-separated list of numbers, e.g. 1,2,4")
    if not temps:
        raise PikvError("--tail-temperatures is empty; give grid temperatures such as 1,2,4")
    return temps


def parse_targets(specs) -> tuple[tuple[str, tuple[int, ...] | None, str], ...]:
    """['hidden:4,8@int8', 'router'] -> (('hidden', (4, 8), 'int8'), ('router', None, 'bf16')).

    KIND[:LAYERS][@ENCODING]; no layers means every layer the kind applies to (every MoE layer for
    router and experts). Layers are 0-based decoder-layer indices; negative ones count from the end.
    """
    out, seen = [], set()
    for spec in specs:
        body, _, enc = spec.strip().partition("@")
        kind, sep, layers = body.partition(":")
        enc = enc or DEFAULT_TENSOR_ENCODING
        if kind not in RICH_KINDS:
            raise PikvError(f"--targets {spec!r}: the kind must be one of {', '.join(RICH_KINDS)} "
                            "(write e.g. hidden:4,8 or kv:6@int8 or router)")
        if kind in seen:
            raise PikvError(f"--targets names {kind} twice; list all its layers in one flag, e.g. {kind}:4,8")
        seen.add(kind)
        if enc not in TENSOR_ENCODINGS:
            raise PikvError(f"--targets {spec!r}: the encoding must be one of {', '.join(TENSOR_ENCODINGS)}")
        if enc == "int8" and kind not in INT8_KINDS:
            raise PikvError(f"--targets {spec!r}: int8 is for the wide targets ({', '.join(INT8_KINDS)}); "
                            f"store {kind} as fp16 or bf16")
        parsed = None
        if sep:
            try:
                parsed = tuple(int(x) for x in layers.split(",") if x.strip())
            except ValueError:
                raise PikvError(f"--targets {spec!r}: layers must be comma-separated integers, e.g. {kind}:4,8")
            if not parsed or len(set(parsed)) != len(parsed):
                raise PikvError(f"--targets {spec!r}: give each layer once, at least one")
        out.append((kind, parsed, enc))
    return tuple(out)


@dataclass(frozen=True)
class DumpConfig:
    teacher: str = opt(help="Teacher: a local HF folder or a hub id.")
    data: str = opt(help="Local file/folder (jsonl, json, parquet, txt, csv, arrow) or a datasets hub name.")
    out: str = opt(help="Cache folder, or object-store URL (s3://, gs://; credentials from the environment), to "
                   "create (or resume).")
    text_field: str | None = opt(None, "Column holding plain text [default: text].")  # "text" when neither is given
    chat_field: str | None = opt(None, "Column holding chat turns [{role, content}]; loss on assistant tokens only.")
    split: str = opt("train")
    data_config: str | None = opt(None, "Config name of a hub dataset.")
    seq_len: int = opt(1024)
    pack: bool = opt(True, "One document per sequence (split, padded) instead of packing.", flag="--no-pack")
    max_sequences: int | None = opt(None, "Dump only the first N sequences.")
    top_k: int = opt(8, "Exact teacher ids per position (0: none, with --sampled-tail).")
    temperatures: tuple[float, ...] = opt((1.0, 2.0, 4.0), "Grid of temperatures whose full-vocabulary normalizer "
                                          "is stored (T=1 is always included, first).",
                                          parse=lambda text: parse_temperatures(text), show="1,2,4")
    batch_size: int = opt(8)
    dtype: str = opt("auto", choices=DTYPES)
    device: str = opt("auto", choices=DEVICES)
    device_map: str | None = opt(None, "Spread a teacher too large for one GPU over all visible GPUs (one process, "
                                 "accelerate).", choices=("auto",))
    overwrite: bool = opt(False, "Replace an existing cache of different inputs.")
    repair: bool = opt(False, "Check every unit of the cache this command wrote at --out and recompute only the "
                       "damaged ones (the root, array metadata and tokenizer rebuilt when damaged); ends with "
                       "`pikv verify`'s check.")
    trust_remote_code: bool = opt(False, "Run the model code a teacher's folder or hub repo ships (its auto_map); "
                                  "off: such a model is refused.")
    shard_seqs: int = opt(64, "Sequences per unit: one zarr shard file per array, the unit of writing, resume and "
                          "extension.", flag="--shard-size")
    sampled_tail: int = opt(16, "Also draw N ids per position from the teacher outside the top-k (an unbiased tail "
                            "estimate for KD; 0: the tail is one mass). The default top-8 + 16 draws in bf16 "
                            "(~55 B/token) beat top-64 fp16 without draws (119 B/token) at T = 1, 2 and 4.")
    tail_temperatures: tuple[float, ...] | None = opt(
        None, "Temperatures the sampled tail draws at, cycled over its slots (slot j at the (j mod m)-th; repeat one "
        "to weight it). Every one must be in --temperatures; the estimate is unbiased at every grid T either way.",
        parse=lambda text: parse_tail_temperatures(text), show="the grid, each once")
    encoding: str = opt("bf16", "Log-prob storage: fp16 (rel. error 2^-11) or the compact bf16 (2^-8, ~1/3 fewer "
                        "bytes).", choices=tuple(ENCODINGS))
    targets: tuple = opt((), "Also store hidden:L,.. (hidden states after layers), kv:L,.. (cached keys/values), "
                         "router (MoE router logits), experts:L,.. (MoE block outputs); @fp16|bf16|int8 [default "
                         "bf16]. Repeatable.", parse=lambda specs: parse_targets(specs), metavar="KIND[:LAYERS][@ENC]")
    max_cache_gb: float | None = opt(None, "Refuse a dump whose estimated size exceeds this [default: the free disk "
                                     "at --out].")
    num_proc: int | None = opt(None, "Processes that tokenize and pack the data, once per node [default: the cores].")
    streaming: bool = opt(False, "Read a hub dataset as a stream, only as far as --max-sequences needs.")

    def __post_init__(self):
        object.__setattr__(self, "out", storage.normalize(self.out))  # file:// is a local folder
        if self.chat_field and self.text_field:
            raise PikvError("give either --text-field or --chat-field, not both")
        if self.repair and self.overwrite:
            raise PikvError("--repair keeps the cache at --out and --overwrite replaces it: give one of them")
        if not self.chat_field and not self.text_field:
            object.__setattr__(self, "text_field", "text")
        if self.seq_len < 2:
            raise PikvError(f"--seq-len must be at least 2; got {self.seq_len}")
        if self.top_k < 0 or (self.top_k == 0 and self.sampled_tail == 0):
            raise PikvError(f"--top-k must be at least 1 (or 0 with --sampled-tail N); got {self.top_k}")
        if not 0 <= self.sampled_tail <= MAX_TAIL:
            raise PikvError(f"--sampled-tail must be in [0, {MAX_TAIL}] (counts are stored as uint8); "
                            f"got {self.sampled_tail}")
        if self.encoding not in ENCODINGS:
            raise PikvError(f"--encoding must be one of {', '.join(ENCODINGS)}; got {self.encoding}")
        if self.max_cache_gb is not None and not self.max_cache_gb > 0:
            raise PikvError(f"--max-cache-gb must be positive; got {self.max_cache_gb}")
        if self.batch_size < 1:
            raise PikvError(f"--batch-size must be at least 1; got {self.batch_size}")
        if self.shard_seqs < 1:
            raise PikvError(f"--shard-size must be at least 1; got {self.shard_seqs}")
        if self.num_proc is not None and self.num_proc < 1:
            raise PikvError(f"--num-proc must be at least 1; got {self.num_proc}")
        if self.streaming and not self.max_sequences:
            raise PikvError("--streaming reads a hub dataset only as far as needed: give --max-sequences N")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise PikvError(f"--max-sequences must be at least 1; got {self.max_sequences}")
        if not self.temperatures or self.temperatures[0] != 1.0:
            raise PikvError("the temperature grid must start with T=1")
        self._check_tail_temperatures()
        if self.dtype not in DTYPES:
            raise PikvError(f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype}")
        if self.device not in DEVICES:
            raise PikvError(f"--device must be one of {', '.join(DEVICES)}; got {self.device}")
        if self.device_map not in (None, "auto"):
            raise PikvError(f"--device-map accepts only 'auto'; got {self.device_map}")

    def _check_tail_temperatures(self):
        """Resolves the default (the grid, without a tail: none) and refuses what the draws cannot realize."""
        temps = self.tail_temperatures
        if not self.sampled_tail:
            if temps:
                raise PikvError("--tail-temperatures says where the sampled tail draws, but there is none: "
                                "add --sampled-tail N or drop --tail-temperatures")
            object.__setattr__(self, "tail_temperatures", ())
            return
        if temps is None:
            temps = tuple(self.temperatures)[:self.sampled_tail]
        temps = tuple(temps)
        if not temps or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in temps):
            raise PikvError(f"--tail-temperatures {temps!r} is not a list of grid temperatures such as 1,2,4")
        off = [t for t in temps if t not in self.temperatures]
        if off:
            raise PikvError(f"--tail-temperatures {off[0]:g} is not in the grid --temperatures "
                            f"{','.join(f'{t:g}' for t in self.temperatures)}: the tail's weights need the "
                            "normalizer there; add it to --temperatures or drop it")
        if len(temps) > self.sampled_tail:
            raise PikvError(f"--tail-temperatures lists {len(temps)} temperatures but --sampled-tail "
                            f"{self.sampled_tail} draws only {self.sampled_tail} ids (one slot each, in turn): "
                            f"list at most {self.sampled_tail} or draw more")
        object.__setattr__(self, "tail_temperatures", tuple(float(t) for t in temps))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_layer_map(text: str) -> tuple[tuple[int, int], ...]:
    """'4:2,8:4' -> ((4, 2), (8, 4)): teacher layer -> student layer."""
    pairs = []
    for item in text.split(","):
        t, sep, st = item.partition(":")
        try:
            pairs.append((int(t), int(st)))
        except ValueError:
            raise PikvError(f"--layer-map {text!r}: write teacher:student pairs, e.g. 4:2,8:4")
        if not sep:
            raise PikvError(f"--layer-map {text!r}: write teacher:student pairs, e.g. 4:2,8:4")
    if len({t for t, _ in pairs}) != len(pairs):
        raise PikvError(f"--layer-map {text!r} maps a teacher layer twice")
    return tuple(pairs)


def parse_freeze(specs) -> tuple[str, ...]:
    """--freeze mlp | embeddings | layers:0,2 (repeatable); checked here, applied in train.freeze()."""
    for spec in specs:
        kind, sep, rest = spec.partition(":")
        ok = (kind in ("mlp", "embeddings") and not sep) or (kind == "layers" and sep and all(
            x.strip().lstrip("-").isdigit() for x in rest.split(",")))
        if not ok:
            raise PikvError(f"--freeze {spec!r}: use mlp, embeddings or layers:0,2")
    return tuple(specs)


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
FEATURE_LOSSES = ("mse", "cosine")
TAILS = ("auto", "bucket", "renorm", "sampled")
RESUMES = ("no", "strict", "auto")  # --resume alone is strict
SCHEDULES = ("cosine", "wsd", "constant")
CROSS_LOSSES = ("match", "uld")  # cross-tokenizer KD (student/xtok.py)


def weight_field(kind: str) -> str:
    """The TrainConfig field (and, dashed, the flag) of a rich target kind's loss weight: hidden -> hidden_weight."""
    return f"{kind}_weight"


@dataclass(frozen=True)
class TrainConfig:
    cache: tuple = opt(help="Teacher cache written by `pikv dump-teacher` (a folder or an s3:// gs:// URL). Repeat "
                       "for several teachers of the same data: KD to the --teacher-weights mixture of them.")
    out: str = opt(help="Run folder: checkpoints, final/, metrics.jsonl.")
    student: str | None = opt(None, "Student: a HF model folder or hub id (fine-tuned from its weights).")
    student_config: str | None = opt(None, "Student: a config json (fresh init with AutoConfig.for_model).")
    trust_remote_code: bool = opt(False, "Run the code a --student folder or hub repo, or the cache's tokenizer, ships "
                                  "(an auto_map); off: such a model or tokenizer is refused.")
    student_tokenizer: str | None = opt(None, "Cross-tokenizer KD: the student's own tokenizer (a folder), not the "
                                        "teacher's. The student trains on its tokens of the cached text; KD (see "
                                        "--cross-loss) where both predict after the same text.")
    cross_loss: str | None = opt(None, "With --student-tokenizer: match (forward KL on the tokens both vocabularies "
                                 "spell the same, the rest in one bucket) or uld (sorted-probability L1, no token "
                                 "identities).", choices=CROSS_LOSSES, show="match")
    kd_weight: float = opt(1.0)
    ce_weight: float = opt(0.0)
    teacher_weights: tuple[float, ...] | None = opt(
        None, "With several --cache: the weight of each teacher in the KD target, e.g. 0.7,0.3 (normalized to sum 1).",
        parse=lambda text: parse_teacher_weights(text), show="equal", metavar="W1,W2,..")
    temperature: float = opt(1.0)
    temperature_schedule: tuple[float, float, str] | None = opt(
        None, "T0:T1[:linear|cosine]: the KD temperature moves from T0 (first step) to T1 (last), logged per step. "
        "With an exact tail (bucket, sampled) it steps through the cache's grid points between them (nearest "
        "one); with --tail renorm it takes every value in between. Replaces --temperature (eval at T1).",
        parse=lambda text: parse_temperature_schedule(text), show="off", metavar="T0:T1")
    divergence: str = opt("forward_kl", choices=DIVERGENCES)
    tail: str = opt("auto", "Teacher mass outside the top-k: one bucket, renormalize it away, or the sampled tail's "
                    "unbiased estimate. auto: sampled when the cache holds a sampled tail, else bucket.", choices=TAILS)
    top_k: int | None = opt(None, "Use only the first N cached ids (<= cached k).")  # None: the cached k
    batch_size: int = opt(8, "Sequences per micro-batch per rank.")
    grad_accum: int = opt(1)
    lr: float = opt(3e-4)
    schedule: str = opt("cosine", choices=SCHEDULES)
    warmup_steps: int = opt(0)
    min_lr_ratio: float = opt(0.1)
    decay_fraction: float = opt(0.2, "WSD: share of steps spent decaying.")
    weight_decay: float = opt(0.1)
    grad_clip: float = opt(1.0, "0 disables clipping.")
    max_steps: int | None = opt(None)
    epochs: float | None = opt(None)
    dtype: str = opt("auto", choices=DTYPES)
    device: str = opt("auto", choices=DEVICES)
    seed: int = opt(0)
    save_every: int = opt(0, "Checkpoint every N steps (0: only at the end).")
    eval_every: int = opt(0, "Held-out eval every N steps (0: only at the end).")
    eval_fraction: float = opt(0.01)
    log_every: int = opt(10)
    resume: str = opt("no", "Continue from the latest complete checkpoint in --out; `--resume auto` starts fresh when "
                      "there is none (for torchrun --max-restarts). Without it a folder with checkpoints is refused.",
                      choices=RESUMES, flag_value="strict")
    tensorboard: bool = opt(False)
    wandb: bool = opt(False)
    zero: bool = opt(False, "Shard optimizer state over ranks (ZeroRedundancyOptimizer).")
    loss_chunk: int = opt(0, "Positions per chunk of the fused LM head + KD + CE (never a [N, V] float32 tensor; "
                          "0: about 128 MiB of logits per chunk). A head with a logit scale or soft-capping takes "
                          "the plain path, checkpointed in chunks of this many positions (0: whole micro-batch).")
    num_workers: int = opt(1, "DataLoader worker processes (0 or 1).")
    reader: str = opt("auto", "What the loader's worker reads the cache's rows with: TensorStore (~6x zarr-python "
                      "here, the same values; pip install tensorstore, or pikv-offline[fast]) or zarr-python. auto: "
                      "TensorStore when installed. With --num-workers 0 rows are read by zarr-python.",
                      choices=READERS)
    hidden_weight: float = opt(0.0, "Hidden-state loss (cache --targets hidden) after a learned student->teacher "
                               "projection.")
    kv_weight: float = opt(0.0, "Key/value loss (cache --targets kv).")
    router_weight: float = opt(0.0, "KL to the teacher's router per MoE layer (cache --targets router; MoE student, "
                               "same expert count).")
    experts_weight: float = opt(0.0, "MoE block output loss (cache --targets experts) against the student's MoE/MLP "
                                "block.")
    feature_loss: str = opt("mse", "Loss of the feature targets (hidden, kv, experts).", choices=FEATURE_LOSSES)
    layer_map: str | None = opt(None, "Teacher:student layer pairs, e.g. 4:2,8:4 [default: each cached layer to the "
                                "student layer at the same relative depth].")
    freeze: tuple = opt((), "Freeze mlp, embeddings (with a tied head: the head too) or layers:0,2. Repeatable.")
    lora_rank: int = opt(0, "Train a LoRA adapter of this rank (peft) on a frozen student; checkpoints hold the "
                         "adapter, final/ the merged model (its adapter in final/adapter/). 0: train the whole student.")
    lora_alpha: float | None = opt(None, "LoRA scale numerator (the update is alpha/rank x B A) [default: 2 x rank].")
    lora_targets: str = opt("all-linear", "Modules that get an adapter: names such as q_proj,v_proj, or all-linear "
                            "(every linear layer but the LM head).")

    def __post_init__(self):
        storage.refuse_url(self.out, "--out", "a run folder holds checkpoints replaced by rename")
        caches = (self.cache,) if isinstance(self.cache, str) else tuple(self.cache)  # Python callers pass one
        if not caches or not all(isinstance(c, str) and c for c in caches):
            raise PikvError("--cache: give the cache folder (repeat --cache for several teachers)")
        object.__setattr__(self, "cache", tuple(storage.normalize(c) for c in caches))
        # one folder spelled two ways (a trailing slash, a link) is still one cache
        where = [c if "://" in c else os.path.realpath(c) for c in self.cache]
        if len(set(where)) != len(where):
            raise PikvError(f"--cache names {next(c for c, r in zip(self.cache, where) if where.count(r) > 1)} twice; "
                            "to weigh a teacher more, use --teacher-weights")
        if self.teacher_weights is not None and len(self.cache) == 1:
            raise PikvError("--teacher-weights weighs several teachers: give one --cache per teacher, or drop it")
        if self.teacher_weights is not None:
            w = self.teacher_weights  # the flag's text, or a list from a config file or config.json
            w = parse_teacher_weights(w if isinstance(w, str) else ",".join(str(x) for x in w)) \
                if isinstance(w, (str, list, tuple)) else None
            if w is None:
                raise PikvError(f"--teacher-weights: give one number per --cache, e.g. 0.7,0.3; got "
                                f"{self.teacher_weights!r}")
            if len(w) != len(self.cache):
                raise PikvError(f"--teacher-weights gives {len(w)} weights for {len(self.cache)} --cache; give one "
                                "per cache, in their order")
            object.__setattr__(self, "teacher_weights", w)
        if self.reader == "tensorstore" and self.num_workers == 0:
            raise PikvError("--reader tensorstore reads in the loader's worker process: use --num-workers 1 (TensorStore "
                            "is not fork-safe, so the training process itself reads with zarr-python)")
        if isinstance(self.resume, bool):  # resume=True from Python means --resume
            object.__setattr__(self, "resume", "strict" if self.resume else "no")
        if self.resume not in RESUMES:
            raise PikvError(f"--resume takes no value or 'auto'; got {self.resume}")
        if bool(self.student) == bool(self.student_config):
            raise PikvError("give exactly one of --student (a model folder or hub id) or --student-config (a config json)")
        if self.divergence not in DIVERGENCES:
            raise PikvError(f"--divergence must be one of {', '.join(DIVERGENCES)}; got {self.divergence}")
        if self.tail not in TAILS:
            raise PikvError(f"--tail must be one of {', '.join(TAILS)}; got {self.tail}")
        if self.schedule not in SCHEDULES:
            raise PikvError(f"--schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise PikvError(f"--temperature must be a positive number; got {self.temperature}")
        check_temperature(self.temperature, "--temperature")
        if self.temperature_schedule is not None:
            v = self.temperature_schedule  # the flag's text, or a list from a config file or config.json
            text = v if isinstance(v, str) else ":".join(str(x) for x in v) if isinstance(v, (list, tuple)) else None
            if text is None:
                raise PikvError(f"--temperature-schedule: give T0:T1[:linear|cosine]; got {v!r}")
            object.__setattr__(self, "temperature_schedule", parse_temperature_schedule(text))
            if self.temperature != 1.0:
                raise PikvError("--temperature and --temperature-schedule both set the KD temperature; give one")
        weights = self.loss_weights()
        if any(not (math.isfinite(w) and w >= 0) for w in weights.values()) or sum(weights.values()) == 0:
            raise PikvError(", ".join(f"--{k}-weight" for k in weights) + " must be >= 0 and not all 0")
        if self.feature_loss not in FEATURE_LOSSES:
            raise PikvError(f"--feature-loss must be one of {', '.join(FEATURE_LOSSES)}; got {self.feature_loss}")
        if self.layer_map is not None:
            parse_layer_map(self.layer_map)
        parse_freeze(self.freeze)
        if self.lora_rank < 0:
            raise PikvError(f"--lora-rank must be >= 0 (0: no adapter); got {self.lora_rank}")
        if self.student_tokenizer is not None and not str(self.student_tokenizer).strip():
            raise PikvError("--student-tokenizer is empty; give the student's tokenizer folder, or drop the flag for "
                            "KD with the teacher's tokenizer")
        check_cross(self.cross_loss, bool(self.student_tokenizer), "--student-tokenizer", self.divergence, self.tail)
        if self.lora_rank and self.freeze:
            raise PikvError("--freeze with --lora-rank: LoRA already freezes the whole student and trains only its "
                            "adapters; drop --freeze (or --lora-targets to choose where adapters go)")
        if not self.lora_rank and (self.lora_alpha is not None or self.lora_targets != "all-linear"):
            raise PikvError("--lora-alpha / --lora-targets need --lora-rank R (R > 0)")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise PikvError(f"--lora-alpha must be a positive number; got {self.lora_alpha}")
        if not [t for t in self.lora_targets.split(",") if t.strip()]:
            raise PikvError("--lora-targets is empty; give module names such as q_proj,v_proj, or all-linear")
        if self.top_k is not None and self.top_k < 1:
            raise PikvError(f"--top-k must be at least 1; got {self.top_k}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise PikvError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if (self.max_steps is None) == (self.epochs is None):
            raise PikvError("give exactly one of --max-steps or --epochs")
        if (self.max_steps is not None and self.max_steps < 1) or (
                self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0)):
            raise PikvError("--max-steps / --epochs must be positive (and finite)")
        if not 0 <= self.eval_fraction < 1:
            raise PikvError(f"--eval-fraction must be in [0, 1); got {self.eval_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise PikvError(f"--min-lr-ratio must be in [0, 1]; got {self.min_lr_ratio}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise PikvError(f"--lr must be a positive finite number; got {self.lr}")
        for name in ("weight_decay", "grad_clip", "min_lr_ratio", "decay_fraction"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise PikvError(f"--{name.replace('_', '-')} must be a finite number >= 0; got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "eval_every", "log_every"):
            if getattr(self, name) < 0:
                raise PikvError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise PikvError(f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype}")
        if self.device not in DEVICES:
            raise PikvError(f"--device must be one of {', '.join(DEVICES)}; got {self.device}")
        if self.num_workers not in (0, 1):
            # One worker streams a rank's batches in order; several would each replay the stream.
            raise PikvError(f"--num-workers must be 0 or 1 (one background reader per rank); got {self.num_workers}")
        if self.loss_chunk < 0:
            raise PikvError(f"--loss-chunk must be >= 0; got {self.loss_chunk}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def loss_weights(self) -> dict[str, float]:
        """Weight of each loss by its name (kd, ce, and each rich target kind)."""
        return {"kd": self.kd_weight, "ce": self.ce_weight,
                **{kind: getattr(self, weight_field(kind)) for kind in RICH_KINDS}}

    def data_order(self) -> dict:
        """The settings that fix which sequences each step sees; a resume must not change them."""
        return {k: getattr(self, k) for k in ("seed", "batch_size", "grad_accum", "eval_fraction")}


@dataclass(frozen=True)
class EvalConfig:
    cache: str = opt(help="Teacher cache written by `pikv dump-teacher`.")
    student: str = opt(help="A student folder, e.g. RUN/final or RUN/checkpoint-N.")
    temperature: float = opt(1.0)
    divergence: str = opt("forward_kl", choices=DIVERGENCES)
    tail: str = opt("auto", "auto: sampled when the cache holds a sampled tail, else bucket.", choices=TAILS)
    top_k: int | None = opt(None)
    eval_fraction: float = opt(0.01, "The held-out share train-student used; 1 evaluates on every sequence (a "
                               "held-out cache).")
    batch_size: int = opt(8)
    device: str = opt("auto", choices=DEVICES)
    cross_tokenizer: bool = opt(False, "The student has its own tokenizer (trained with --student-tokenizer): "
                                "evaluate it on its tokens of the cached text, KD by --cross-loss.")
    cross_loss: str | None = opt(None, "With --cross-tokenizer: the KD figure's loss, match or uld (as train-student).",
                                 choices=CROSS_LOSSES, show="match")
    as_json: bool = opt(False, "Print one JSON object.", flag="--json")

    def __post_init__(self):
        if not 0 < self.eval_fraction <= 1:
            raise PikvError(f"--eval-fraction must be in (0, 1]; got {self.eval_fraction}")
        if self.batch_size < 1:
            raise PikvError(f"--batch-size must be at least 1; got {self.batch_size}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise PikvError(f"--temperature must be a positive number; got {self.temperature}")
        check_temperature(self.temperature, "--temperature")
        if self.top_k is not None and self.top_k < 1:
            raise PikvError(f"--top-k must be at least 1; got {self.top_k}")
        check_cross(self.cross_loss, self.cross_tokenizer, "--cross-tokenizer", self.divergence, self.tail)


@dataclass(frozen=True)
class InspectConfig:
    cache: str = opt(argument=True, metavar="CACHE_DIR")
    as_json: bool = opt(False, "Print one JSON object.", flag="--json")


@dataclass(frozen=True)
class VerifyConfig:
    cache: str = opt(argument=True, metavar="CACHE_DIR")
    recompute: int = opt(0, "Re-run the teacher on the first N sequences and measure the cache's fidelity per loss "
                         "mode and T.")
    teacher: str | None = opt(None, "The teacher that wrote the cache (for --recompute).")
    student: str | None = opt(None, "A student folder: adds the gradient angle of each mode vs full KD.")
    trust_remote_code: bool = opt(False, "Run the code the teacher, the --student or the cache's tokenizer ships "
                                  "(an auto_map); off: such a model or tokenizer is refused.")
    device: str = opt("auto", choices=DEVICES)
    batch_size: int = opt(8)
    as_json: bool = opt(False, "Print one JSON object.", flag="--json")

    def __post_init__(self):
        if self.recompute < 0:
            raise PikvError(f"--recompute must be >= 0; got {self.recompute}")
        if self.recompute and not self.teacher:
            raise PikvError("--recompute N needs --teacher DIR (the teacher that wrote the cache)")
        if self.student and not self.recompute:
            raise PikvError("--student is used only with --recompute N (the gradient angle)")
        if self.batch_size < 1:
            raise PikvError(f"--batch-size must be at least 1; got {self.batch_size}")


@dataclass(frozen=True)
class MakeStudentConfig:
    teacher: str = opt(help="Teacher: a local HF folder or a hub id.")
    keep_layers: str = opt(help="Teacher layers to copy, in order, e.g. 0,2,4,6.")  # negative ones count from the end
    out: str = opt(help="Folder for the student (weights, config, tokenizer).")
    overwrite: bool = opt(False, "Replace a non-empty --out.")
    trust_remote_code: bool = opt(False, "Run the model code a teacher's folder or hub repo ships (its auto_map); "
                                  "off: such a model is refused.")

    def __post_init__(self):
        storage.refuse_url(self.out, "--out", "the student folder is written with rename")



NOT_SWEEPABLE = {"cache", "teacher_weights", "out", "student", "student_config", "resume", "layer_map", "freeze", "lora_targets",
                 "temperature_schedule"}


def _caster(field: dataclasses.Field):
    ann = str(field.type)
    if "bool" in ann:
        return lambda v: v.lower() in ("1", "true", "yes")
    if "float" in ann:
        return float
    if "int" in ann:
        return int
    return str


def parse_grid(specs: typing.Sequence[str]) -> tuple[tuple[str, tuple], ...]:
    """['temperature=1,2', 'kd-weight=0.5,1'] -> (('temperature', (1.0, 2.0)), ('kd_weight', (0.5, 1.0)))."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        if not sep or not values.strip():
            raise PikvError(f"--grid {spec!r}: write it as flag=v1,v2,... e.g. --grid temperature=1,2")
        if name not in fields or name in NOT_SWEEPABLE:
            raise PikvError(f"--grid {spec!r}: {key} is not a train-student setting that can be swept")
        if any(name == g[0] for g in grid):
            raise PikvError(f"--grid names {key} twice; give all its values in one --grid")
        try:
            grid.append((name, tuple(_caster(fields[name])(v.strip()) for v in values.split(","))))
        except ValueError:
            raise PikvError(f"--grid {spec!r}: a value is not a valid {fields[name].type}")
    if not grid:
        raise PikvError("give at least one --grid flag=v1,v2,...")
    return tuple(grid)


@dataclass(frozen=True)
class SweepConfig:
    out: str = opt(help="Sweep folder: one run folder per grid point, results.csv, results.png.")
    grid: tuple = opt(help="flag=v1,v2,... over a train-student flag, e.g. --grid temperature=1,2,4; repeat for a "
                      "cross product.", parse=lambda specs: parse_grid(specs))
    base: dict = opt(cli=False)  # the fixed train-student settings (every TrainConfig field but out and resume)

    def __post_init__(self):
        storage.refuse_url(self.out, "--out", "a sweep folder holds its runs' folders")

    def points(self) -> list[dict]:
        names = [g[0] for g in self.grid]
        return [dict(zip(names, combo)) for combo in itertools.product(*(g[1] for g in self.grid))]

    def run_name(self, point: dict) -> str:
        return "_".join(f"{k.replace('_', '-')}={v:g}" if isinstance(v, float) else f"{k.replace('_', '-')}={v}"
                        for k, v in point.items())
