"""Frozen, validated configs of the stages; the CLI builds them, each stage's run(cfg) takes one."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .cache.format import DEFAULT_TENSOR_ENCODING, ENCODINGS, INT8_KINDS, MAX_TAIL, RICH_KINDS, TENSOR_ENCODINGS
from .errors import PikvError

DTYPES = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


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
    teacher: str
    data: str
    out: str
    text_field: str | None = None  # "text" when neither field is given
    chat_field: str | None = None
    split: str = "train"
    data_config: str | None = None
    seq_len: int = 1024
    pack: bool = True
    max_sequences: int | None = None
    top_k: int = 64
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    overwrite: bool = False
    shard_seqs: int = 64
    sampled_tail: int = 0  # draws per position from the teacher's distribution outside the top-k
    encoding: str = "fp16"
    targets: tuple = ()  # parse_targets(): rich targets (hidden / kv / router / experts)
    max_cache_gb: float | None = None  # refuse a larger estimate; None: the free disk at --out

    def __post_init__(self):
        if self.chat_field and self.text_field:
            raise PikvError("give either --text-field or --chat-field, not both")
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
        if self.max_sequences is not None and self.max_sequences < 1:
            raise PikvError(f"--max-sequences must be at least 1; got {self.max_sequences}")
        if not self.temperatures or self.temperatures[0] != 1.0:
            raise PikvError("the temperature grid must start with T=1")
        if self.dtype not in DTYPES:
            raise PikvError(f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype}")
        if self.device not in DEVICES:
            raise PikvError(f"--device must be one of {', '.join(DEVICES)}; got {self.device}")
        if self.device_map not in (None, "auto"):
            raise PikvError(f"--device-map accepts only 'auto'; got {self.device_map}")

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
RICH_WEIGHTS = {"feature_weight": "hidden", "kv_weight": "kv", "router_weight": "router", "expert_weight": "experts"}
TAILS = ("auto", "bucket", "renorm", "sampled")
SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(frozen=True)
class TrainConfig:
    cache: str
    out: str
    student: str | None = None
    student_config: str | None = None
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    divergence: str = "forward_kl"
    tail: str = "auto"  # sampled when the cache holds a sampled tail, else bucket
    top_k: int | None = None  # None: the cached k
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD: share of the steps spent decaying
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_steps: int | None = None
    epochs: float | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    save_every: int = 0
    eval_every: int = 0
    eval_fraction: float = 0.01
    log_every: int = 10
    resume: bool = False
    tensorboard: bool = False
    wandb: bool = False
    zero: bool = False
    loss_chunk: int = 0  # positions per chunk of the vocabulary projection + loss; 0 = no chunking
    num_workers: int = 1
    feature_weight: float = 0.0  # hidden-state targets
    kv_weight: float = 0.0
    router_weight: float = 0.0
    expert_weight: float = 0.0
    feature_loss: str = "mse"  # hidden, kv and experts: mse or cosine after the projection
    layer_map: str | None = None  # "4:2,8:4" teacher:student; None: evenly spaced by depth
    freeze: tuple = ()

    def __post_init__(self):
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
        weights = [self.kd_weight, self.ce_weight, *(getattr(self, w) for w in RICH_WEIGHTS)]
        if any(not (math.isfinite(w) and w >= 0) for w in weights) or sum(weights) == 0:
            raise PikvError("--kd-weight, --ce-weight, --feature-weight, --kv-weight, --router-weight and "
                            "--expert-weight must be >= 0 and not all 0")
        if self.feature_loss not in FEATURE_LOSSES:
            raise PikvError(f"--feature-loss must be one of {', '.join(FEATURE_LOSSES)}; got {self.feature_loss}")
        if self.layer_map is not None:
            parse_layer_map(self.layer_map)
        parse_freeze(self.freeze)
        if self.top_k is not None and self.top_k < 1:
            raise PikvError(f"--top-k must be at least 1; got {self.top_k}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise PikvError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if (self.max_steps is None) == (self.epochs is None):
            raise PikvError("give exactly one of --max-steps or --epochs")
        if (self.max_steps is not None and self.max_steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise PikvError("--max-steps / --epochs must be positive")
        if not 0 <= self.eval_fraction < 1:
            raise PikvError(f"--eval-fraction must be in [0, 1); got {self.eval_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise PikvError(f"--min-lr-ratio must be in [0, 1]; got {self.min_lr_ratio}")
        if self.lr <= 0:
            raise PikvError(f"--lr must be positive; got {self.lr}")
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

    def data_order(self) -> dict:
        """The settings that fix which sequences each step sees; a resume must not change them."""
        return {k: getattr(self, k) for k in ("seed", "batch_size", "grad_accum", "eval_fraction")}
