"""Training checkpoints: find the latest, save atomically, load and check one, RNG states.

    RUN/checkpoint-<step>/   the student (save_pretrained), the cache's tokenizer, trainer_state.pt
    RUN/final/               the student and tokenizer alone

With --lora-rank a checkpoint holds the adapter instead of the student, and final/ the merged student
with the adapter in final/adapter/ (student/lora.py).

trainer_state.pt holds the optimizer, scheduler and scaler states, the step and data position,
every rank's RNG states, the config, the data-order settings, the cache key and the rich losses'
projections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from .. import dist, lock
from ..errors import PikvError, brief

STATE_FILE = "trainer_state.pt"
# What a checkpoint copies from the cache's tokenizer folder: tokenizer files by name, nothing else (a
# model.safetensors or config.json placed there must never replace the trained student's own).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")


@dataclass
class Progress:
    """Where a run is: optimizer steps done, the epoch and global micro-step in it (the data position)."""
    step: int = 0
    epoch: int = 0
    micro: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    tokens_seen: int = 0


LOCK_FILE = ".pikv-train.lock"


@contextlib.contextmanager
def out_lock(out: str, hold: bool = True):
    """Creates the run folder ``out`` and, when ``hold`` (rank 0), holds an exclusive lock on it for the
    run's life: a second run on the same folder is refused. The kernel drops the lock when the process
    dies, so a crashed run never leaves it behind."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PikvError(f"--out {out} is a file; give a folder for the run")
    os.makedirs(out, exist_ok=True)
    with lock.hold(os.path.join(out, LOCK_FILE), what=f"--out {out}", by="training run") if hold \
            else contextlib.nullcontext():
        yield


def latest(out: str) -> str | None:
    """The checkpoint-<step> folder of ``out`` with the highest step and a state file, or None."""
    found = [(int(p.rsplit("-", 1)[1]), p) for p in glob.glob(os.path.join(out, "checkpoint-*"))
             if p.rsplit("-", 1)[1].isdigit() and os.path.isfile(os.path.join(p, STATE_FILE))]
    return max(found)[1] if found else None


def save(path: str, student, tokenizer_dir: str, state: dict | None, adapter=None,
         tokenizer_links: bool = False) -> None:
    """Atomic: everything goes to a temporary folder that is renamed into place at the end. With a
    LoRA ``adapter``: a checkpoint (``state``) holds the adapter, final/ (no state) the merged student.
    ``tokenizer_links``: follow links in ``tokenizer_dir`` (the user's own --student-tokenizer, e.g. a hub
    snapshot, whose files link to its blobs); a cache's tokenizer folder is not trusted with them."""
    from . import lora

    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter is None:
        student.save_pretrained(tmp)
    elif state:
        lora.save_adapter(adapter, tmp)
    else:
        lora.save_merged(adapter, tmp)
    for f in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, f)
        if os.path.isfile(src) and (tokenizer_links or not os.path.islink(src)):
            shutil.copyfile(src, os.path.join(tmp, f))
    if state:
        torch.save(state, os.path.join(tmp, STATE_FILE))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load(ckpt: str, *, world_size: int, data_order: dict, cache_key: str, cache_sequences: int,
         unit_seqs: int | None = None) -> dict:
    """The trainer state of ``ckpt``; refuses one of another world size, data order or cache."""
    try:  # tensors and plain containers only: a crafted pickle must not run code
        state = torch.load(os.path.join(ckpt, STATE_FILE), weights_only=True)
    except Exception as e:
        raise PikvError(f"--resume: {os.path.join(ckpt, STATE_FILE)} is not a trainer state this pikv can load safely "
                        f"({brief(e)}); it was not written by this pikv, or is damaged: use a new --out")
    if not isinstance(state, dict):
        state = {}
    missing = [k for k in ("world_size", "data_order", "cache_key", "optimizer", "scheduler", "scaler", "rng",
                           "projections", *(f.name for f in dataclasses.fields(Progress))) if k not in state]
    if missing:
        raise PikvError(f"--resume: {os.path.join(ckpt, STATE_FILE)} lacks {missing[:3]}; it is damaged or not a "
                        "trainer state of this pikv: remove that checkpoint or use a new --out")
    if state["world_size"] != world_size:
        raise PikvError(f"--resume: the checkpoint was written by {state['world_size']} ranks, this run has "
                        f"{world_size}; resume with the same number of ranks")
    # the cache's unit size orders an epoch (units are permuted) and picks the held-out chunks, yet a re-dump of
    # the same content at another --shard-seqs has the same cache key
    if state["data_order"] != data_order or state["cache_key"] != cache_key or state.get("cache_sequences") not in (
            None, cache_sequences) or state.get("cache_unit_seqs") not in (None, unit_seqs):
        raise PikvError("--resume: the cache or a setting that fixes the data order (seed, batch size, "
                        "grad accum, eval fraction) changed since the checkpoint; use a new --out")
    return state


def joint_cache_key(caches) -> str:
    """The cache key of a run's caches (several teachers: each, in order), as checkpoints and config.json hold it."""
    return "+".join(c.attrs.cache_key for c in caches)


def check_same_run(state: dict, ckpt: str, cfg, lora_base: str | None, tail_mode: str | None = None,
                   cache_top_k: int | None = None) -> None:
    """Refuses a resume that would continue another run than the checkpoint's: a whole student against a
    LoRA adapter, an adapter of another base (``lora_base``: this run's base fingerprint, None without
    LoRA), another KD target (TARGET_FIELDS, compared as resolved: a default and the value it stands for
    are one; ``tail_mode`` the tail and ``cache_top_k`` the k a default resolves to) or another student
    tokenizer (load() already checks the data order and the cache)."""
    was = state.get("lora_base")
    if was != lora_base:
        raise PikvError(f"--resume: the checkpoint {ckpt} " + (
            "holds a LoRA adapter; resume with its --lora-rank" if lora_base is None else
            "holds a whole student, not a LoRA adapter; drop --lora-rank" if was is None else
            "holds an adapter of another base student (its weights differ from --student / --student-config's)")
            + ", or use a new --out")
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    if saved.get("student_tokenizer") and "cross_loss" not in saved:
        saved = {**saved, "cross_loss": "uld"}  # a run before --cross-loss: ULD was its only loss

    def resolved(field, value, caches):
        value = tuple(value) if isinstance(value, list) else value
        if field == "top_k" and value is None:
            return cache_top_k
        if field == "teacher_weights":
            try:
                return tuple(round(float(w), 9) for w in (value or [1.0 / max(len(caches), 1)] * len(caches)))
            except (TypeError, ValueError):  # a damaged config: compared as it is, so refused
                return value
        if field == "cross_loss" and value is None:
            return "match" if cfg.student_tokenizer else None
        return value

    # The settings that fix the KD target: a resume with another one would train the rest of the run towards
    # another objective, and config.json would describe the whole run as if it had been this one.
    for field in TARGET_FIELDS:
        if field not in saved:  # a checkpoint of a version before the setting existed
            continue
        was, now = resolved(field, saved[field], cfg.cache), resolved(field, getattr(cfg, field), cfg.cache)
        if was != now:
            flag = "--" + field.replace("_", "-")
            raise PikvError(f"--resume: the checkpoint's run had {flag} {_shown(was)}, this one {_shown(now)}; "
                            "resume with the same setting or use a new --out")
    if state.get("tail_mode") not in (None, tail_mode):  # --tail as resolved: auto and what it chose are one
        raise PikvError(f"--resume: the checkpoint's run had the {state['tail_mode']} tail, this one {tail_mode} "
                        f"(--tail {cfg.tail}); resume with the same --tail or use a new --out")
    if bool(saved.get("student_tokenizer")) != bool(cfg.student_tokenizer):
        raise PikvError(f"--resume: the checkpoint's run had --student-tokenizer {saved.get('student_tokenizer')}, "
                        f"this one {cfg.student_tokenizer}; resume with the same or use a new --out")
    if cfg.student_tokenizer:  # the same tokenizer, wherever it lies now: the checkpoint holds a copy of it
        from transformers import AutoTokenizer

        from ..modeling import tokenizer_hash

        try:
            same = tokenizer_hash(AutoTokenizer.from_pretrained(ckpt, trust_remote_code=False)) == \
                tokenizer_hash(AutoTokenizer.from_pretrained(cfg.student_tokenizer, trust_remote_code=False))
        except Exception as e:
            raise PikvError(f"--resume: the student tokenizer in {ckpt} does not load ({brief(e)}); remove that "
                            "checkpoint or use a new --out")
        if not same:
            raise PikvError(f"--resume: --student-tokenizer {cfg.student_tokenizer} is another tokenizer than the one "
                            f"the checkpoint's run trained with (kept in {ckpt}); give that one or use a new --out")


TARGET_FIELDS = ("temperature", "temperature_schedule", "top_k", "divergence", "teacher_weights", "cross_loss")


def _shown(value) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, (list, tuple)):
        sep = ":" if value and isinstance(value[-1], str) else ","  # a schedule T0:T1:shape, or weights
        return sep.join(f"{x:g}" if isinstance(x, float) else str(x) for x in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def write(path: str, *, d: dist.Dist, progress: Progress | None, model, distiller, opt, sched, scaler, cache_key: str,
          cache, cfg, total: int, tokenizer_dir: str, adapter=None, lora_base: str | None = None,
          tail_mode: str | None = None, tokenizer_links: bool = False) -> None:
    """Every rank: a checkpoint of the run at ``path`` (rank 0 writes it); ``progress`` None writes the
    student alone (final/). Gathers every rank's RNG states, and the ZeRO shards of the optimizer."""
    if progress is not None and cfg.zero and d.world_size > 1:
        opt.consolidate_state_dict(to=0)
    rngs = dist.all_gather_object(rng_state())
    if d.is_main:
        state = None if progress is None else {
            **dataclasses.asdict(progress), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "rng": rngs, "world_size": d.world_size, "data_order": cfg.data_order(),
            "cache_key": cache_key, "config": cfg.to_dict(), "projections": distiller.proj.state_dict(),
            "total_steps": total, "cache_sequences": cache.n, "lora_base": lora_base, "tail_mode": tail_mode,
            "cache_unit_seqs": cache.attrs.unit_seqs}
        save(path, model, tokenizer_dir, state, adapter, tokenizer_links)
    dist.barrier()


def restore(state: dict, *, rank: int, opt, sched, scaler) -> Progress:
    """Load a trainer state into the optimizer, scheduler, scaler and this rank's RNGs; where the run was."""
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][rank])
    return Progress(**{f.name: state[f.name] for f in dataclasses.fields(Progress)})


def load_student(ckpt: str, trust_remote_code: bool = False):
    """The checkpoint's weights, through from_pretrained so tied weights load as saved."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise PikvError(f"--resume: the student in {ckpt} does not load ({brief(e)}); remove that checkpoint or "
                        "use a new --out")


def rng_state() -> dict:
    """Every RNG a rank uses, as tensors and plain values (so torch.load(weights_only=True) reads it back)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
