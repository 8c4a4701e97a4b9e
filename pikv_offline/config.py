"""Frozen, validated configs of the stages; the CLI builds them, each stage's run(cfg) takes one."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

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

    def __post_init__(self):
        if self.chat_field and self.text_field:
            raise PikvError("give either --text-field or --chat-field, not both")
        if not self.chat_field and not self.text_field:
            object.__setattr__(self, "text_field", "text")
        if self.seq_len < 2:
            raise PikvError(f"--seq-len must be at least 2; got {self.seq_len}")
        if self.top_k < 1:
            raise PikvError(f"--top-k must be at least 1; got {self.top_k}")
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
