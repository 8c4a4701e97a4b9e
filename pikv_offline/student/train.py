"""Stage two: train a student from the teacher cache; the teacher is never loaded.

    pikv train-student --cache CACHE --student-config student.json --out RUN --max-steps 200
    torchrun --nproc-per-node 2 -m pikv_offline train-student --cache CACHE --student DIR --out RUN --epochs 1
    pikv train-student ... --ce-weight 1 --feature-weight 1 --router-weight 0.1 --layer-map 4:2,8:4

Read top to bottom: set-up (cache, student, optimizer, resume), then one loop of optimizer steps.
Every loss is a sum over valid positions divided once by the step's global count of valid
positions (all micro-batches, all ranks); DDP averages gradients over ranks, so the loss is
multiplied by the world size to make that average a sum.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from .. import dist
from ..cache.reader import open_cache
from ..cache import format as F
from ..config import RICH_WEIGHTS, TrainConfig, parse_layer_map
from ..errors import PikvError, brief
from ..modeling import (Capture, decoder_layers, hidden_width, kv_shape, layer_count, lm_logits, mlp_block, moe_layers,
                        resolve_dtype, router_experts, tokenizer_hash)
from . import data as D
from .losses import ce_loss, feature_loss, kd_loss, router_loss

STATE_FILE = "trainer_state.pt"


# target kind -> its loss's name in metrics and weights: the --<name>-weight flag's name
LOSS_NAMES = {kind: flag.removesuffix("_weight") for flag, kind in RICH_WEIGHTS.items()}


@dataclass(frozen=True)
class Pair:
    """One rich loss term: the cache's ``kind`` target of teacher layer ``t`` against student layer ``s``."""
    kind: str
    t: int
    s: int

    @property
    def key(self) -> str:  # ModuleDict keys may not hold dots or slashes
        return f"{self.kind}_{self.t}_{self.s}"


class Distiller(torch.nn.Module):
    """The trained module: the student, the projections of the rich losses, and the losses.

    DDP wraps this module, so the whole forward, loss and projections included, goes through DDP
    and the optimizer sees the projections. Only ``student`` is exported; the projections go to
    trainer_state.pt. A projection maps the student's width to the teacher's; it starts as the
    identity when the widths agree (a student made from the teacher's layers starts at zero loss).
    """

    def __init__(self, student, *, temperature: float, divergence: str, tail: str, loss_chunk: int,
                 kd_weight: float = 1.0, ce_weight: float = 1.0, rel_error: float = 2.0 ** -11, draws: int = 0,
                 pairs: tuple[Pair, ...] = (), targets: dict | None = None, feature_loss: str = "mse"):
        super().__init__()
        self.student = student
        self.temperature, self.divergence, self.tail, self.loss_chunk = temperature, divergence, tail, loss_chunk
        self.kd_weight, self.ce_weight = kd_weight, ce_weight
        self.rel_error, self.draws = rel_error, draws
        self.pairs, self.feature_loss = tuple(pairs), feature_loss
        self.t_shapes = {kind: tuple(t["shape"]) for kind, t in (targets or {}).items() if kind in LOSS_NAMES}
        self.proj = torch.nn.ModuleDict()
        for p in self.pairs:
            if p.kind in ("hidden", "experts"):
                self.proj[p.key] = _projection(hidden_width(student.config), self.t_shapes[p.kind][0])
            elif p.kind == "kv":
                for side in ("key", "value"):
                    self.proj[f"{p.key}_{side}"] = _projection(math.prod(kv_shape(student.config)),
                                                               math.prod(self.t_shapes["kv"]))
        wanted: dict[str, set] = {}
        for p in self.pairs:
            wanted.setdefault(p.kind, set()).add(p.s)
        self.capture = Capture(student, {k: tuple(sorted(v)) for k, v in wanted.items()}, detach=False) \
            if wanted else None

    def _losses(self, h, labels, t_ids, t_logprobs, t_tnorm, tail_ids, tail_logprobs, tail_counts):
        logits = lm_logits(self.student, h)
        # One fused log-softmax serves CE and (at T=1) KD; a part with weight 0 is still reported
        # but kept out of the graph, so it costs no backward pass.
        lsm1 = torch.log_softmax(logits.float(), dim=-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.ce_weight > 0):
            ce, _ = ce_loss(lsm1, labels)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.kd_weight > 0):
            T = self.temperature
            lsmT = lsm1 if T == 1 else torch.log_softmax(logits.float() / T, dim=-1)
            kd, _ = kd_loss(lsmT, t_ids, t_logprobs, t_tnorm, temperature=T, kind=self.divergence, tail=self.tail,
                            rel_error=self.rel_error, tail_ids=tail_ids, tail_logprobs=tail_logprobs,
                            tail_counts=tail_counts, draws=self.draws)
        # Top-1 agreement with the teacher is an eval figure; an argmax over V per step is not free.
        top1 = torch.zeros((), dtype=torch.long)
        if not self.training and t_ids.shape[1]:
            t_top1 = torch.gather(t_ids, 1, t_logprobs.argmax(-1, keepdim=True))[:, 0]
            top1 = (logits.argmax(-1) == t_top1).sum()
        return kd, ce, top1

    @property
    def loss_names(self) -> list[str]:
        """The keys of forward()'s loss dict, in a fixed order: kd, ce, then each rich loss with pairs."""
        return list(dict.fromkeys(["kd", "ce"] + [LOSS_NAMES[p.kind] for p in self.pairs]))

    def _rich_losses(self, valid, shape, rich: dict) -> dict[str, torch.Tensor]:
        """Sum over valid positions of each rich loss, averaged over its layer pairs."""
        got = self.capture.collect(*shape)
        n_pairs = {k: sum(p.kind == k for p in self.pairs) for k in LOSS_NAMES}
        sums: dict[str, torch.Tensor] = {}
        for p in self.pairs:
            if p.kind == "router":
                part, _ = router_loss(got[("router", p.s)][:, :-1][valid], rich[F.rich_name("router", p.t)][:, :-1][valid])
            elif p.kind == "kv":
                part = 0.0
                for side in ("key", "value"):
                    s = self.proj[f"{p.key}_{side}"](got[("kv", p.s, side)][:, :-1][valid].flatten(1))
                    t = rich[F.rich_name("kv", p.t, side)][:, :-1][valid]
                    part = part + feature_loss(s.view(t.shape), t, self.feature_loss)[0] / 2
            else:
                s = self.proj[p.key](got[(p.kind, p.s)][:, :-1][valid])
                t = rich[F.rich_name(p.kind, p.t)][:, :-1][valid]
                part, _ = feature_loss(s[:, None], t[:, None], self.feature_loss)
            name = LOSS_NAMES[p.kind]
            sums[name] = sums.get(name, 0.0) + part / n_pairs[p.kind]
        return sums

    def forward(self, input_ids, loss_mask, t_ids, t_logprobs, t_tnorm, tail_ids, tail_logprobs, tail_counts, **rich):
        """Sums over the valid predictions of the micro-batch: ({kd, ce, and each rich loss}, top-1 hits, count).
        ``rich`` holds the cache's rich targets by array name, [B, L, ...] float32."""
        kwargs = self.capture.forward_kwargs() if self.capture else {"use_cache": False}
        h = self.student.base_model(input_ids=input_ids, **kwargs).last_hidden_state
        valid = loss_mask[:, 1:]  # the prediction at t is for token t+1
        args = (h[:, :-1][valid], input_ids[:, 1:][valid],
                *(a[:, :-1][valid] for a in (t_ids, t_logprobs, t_tnorm, tail_ids, tail_logprobs, tail_counts)))
        n = args[0].shape[0]
        chunk = self.loss_chunk or n
        if chunk >= n:
            kd, ce, top1 = self._losses(*args)
        else:
            # Checkpointing each chunk keeps only [chunk, V] logits alive: recomputed in backward.
            kd = ce = top1 = 0
            for s in range(0, n, chunk):
                part = [a[s:s + chunk] for a in args]
                k_, c_, t_ = torch.utils.checkpoint.checkpoint(self._losses, *part, use_reentrant=False)
                kd, ce, top1 = kd + k_, ce + c_, top1 + t_
        losses = {"kd": kd, "ce": ce}
        if self.pairs:
            losses.update(self._rich_losses(valid, input_ids.shape, rich))
        return losses, top1, n


def _projection(d_in: int, d_out: int) -> torch.nn.Linear:
    proj = torch.nn.Linear(d_in, d_out, bias=False)
    if d_in == d_out:
        torch.nn.init.eye_(proj.weight)
    return proj


def resolve_pairs(cache, student, weights: dict[str, float], layer_map: str | None) -> tuple[Pair, ...]:
    """The (teacher layer, student layer) pairs of every rich loss with a weight: --layer-map, or each
    stored teacher layer to the student layer at the same relative depth. Refuses what cannot work."""
    n_t, n_s = int(cache.attrs["teacher"]["num_layers"]), layer_count(student.config)
    explicit = dict(parse_layer_map(layer_map)) if layer_map else None
    for t, s in (explicit or {}).items():
        if not 0 <= t < n_t or not 0 <= s < n_s:
            raise PikvError(f"--layer-map {t}:{s}: the teacher has layers 0..{n_t - 1} and the student 0..{n_s - 1}")
    flags = {kind: "--" + flag.replace("_", "-") for flag, kind in RICH_WEIGHTS.items()}
    pairs = []
    for kind, w in weights.items():
        if not w:
            continue
        stored = cache.attrs["targets"].get(kind)
        if not stored:
            raise PikvError(f"{flags[kind]} {w:g}: the cache holds no {kind} targets; re-dump with "
                            f"--targets {kind}{':LAYERS' if kind != 'router' else ''} or drop {flags[kind]}")
        layers = [int(x) for x in stored["layers"]]
        if explicit is not None:
            use = [(t, explicit[t]) for t in layers if t in explicit]
            if not use:
                raise PikvError(f"{flags[kind]}: none of the cache's {kind} layers {layers} is in --layer-map {layer_map}")
        else:
            use = [(t, min(n_s - 1, max(0, round((t + 1) * n_s / n_t) - 1))) for t in layers]
        if kind == "router":
            s_moe = moe_layers(student)
            if not s_moe:
                raise PikvError(f"--router-weight: the student ({student.config.model_type}) is dense; router "
                                "distillation needs a mixture-of-experts student with the teacher's expert count")
            for t, s in use:
                if s not in s_moe:
                    raise PikvError(f"--router-weight: student layer {s} (from teacher layer {t}) is not a MoE layer; "
                                    f"the student's MoE layers are {sorted(s_moe)}: set --layer-map")
                e_s, e_t = router_experts(s_moe[s][0]), int(stored["shape"][0])
                if e_s != e_t:
                    raise PikvError(f"--router-weight: the student's router has {e_s} experts, the teacher's {e_t}; "
                                    "router distillation needs the same expert count")
        pairs += [Pair(kind, t, s) for t, s in use]
    return tuple(pairs)


def freeze(model, specs: tuple[str, ...]) -> int:
    """--freeze mlp | embeddings | layers:0,2: turn off those parameters' gradients; returns how many
    parameters are frozen. With tied embeddings, freezing embeddings freezes the LM head too."""
    _, layers = decoder_layers(model)
    for spec in specs:
        kind, _, rest = spec.partition(":")
        if kind == "mlp":
            modules = [mlp_block(model, i) for i in range(len(layers))]
        elif kind == "embeddings":
            modules = [model.get_input_embeddings()]
            pos = getattr(model.base_model, "wpe", None) or getattr(model.base_model, "embed_positions", None)
            modules += [pos] if isinstance(pos, torch.nn.Module) else []
        else:
            idx = [int(x) for x in rest.split(",")]
            bad = [i for i in idx if not -len(layers) <= i < len(layers)]
            if bad:
                raise PikvError(f"--freeze {spec}: the student has layers 0..{len(layers) - 1}, not {bad[0]}")
            modules = [layers[i] for i in idx]
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if not p.requires_grad)


def resolve_targets(cache, top_k: int | None, temperature: float, tail: str,
                    divergence: str = "forward_kl") -> tuple[int, int, str]:
    """(k to read, index of the temperature in the grid, tail mode); refuses what the cache cannot serve."""
    if tail == "auto":
        tail = "sampled" if cache.tail else "bucket"
    k = top_k or cache.top_k
    if k > cache.top_k:
        raise PikvError(f"--top-k {k} is above the cached k of {cache.top_k}; use --top-k {cache.top_k} or less")
    if tail == "sampled":
        if not cache.tail:
            raise PikvError("--tail sampled: the cache holds no sampled tail; re-dump with --sampled-tail N "
                            "or use --tail bucket")
        if divergence != "forward_kl":
            raise PikvError(f"--tail sampled estimates forward KL only; use --divergence forward_kl "
                            f"(got {divergence}) or --tail bucket")
        if k != cache.top_k:
            # The draws come from outside the stored head; a shorter head would leave ids in neither.
            raise PikvError(f"--tail sampled uses the whole cached head; drop --top-k {k} (cached k {cache.top_k})")
    elif cache.top_k == 0:
        raise PikvError(f"--tail {tail}: the cache has no top-k head (dumped with --top-k 0); use --tail sampled")
    grid = cache.temperatures
    if temperature in grid:
        return k, grid.index(temperature), tail
    if tail == "renorm":
        return k, 0, tail  # renorm needs no normalizer at T
    raise PikvError(f"--temperature {temperature} is not in the cache's grid {grid}: the teacher at T is exact "
                    "only there; pick one of those, re-dump with it, or use --tail renorm")


def lr_factor(step: int, cfg: TrainConfig, total: int) -> float:
    """Multiplier of --lr at ``step``: linear warmup, then cosine / WSD / constant down to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    span = max(total - cfg.warmup_steps - 1, 1)  # the last step reaches the floor
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.schedule == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = 1.0 - cfg.decay_fraction  # WSD: warmup, stable at the peak, then linear decay
    if progress < decay_start:
        return 1.0
    return 1.0 - (1 - lo) * (progress - decay_start) / max(cfg.decay_fraction, 1e-9)


def load_student(cfg: TrainConfig, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if cfg.student_config:
        try:
            spec = json.load(open(cfg.student_config))
            config = AutoConfig.for_model(**spec)
        except Exception as e:
            raise PikvError(f"--student-config {cfg.student_config}: not a usable model config json ({brief(e)})")
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config), None
    path = os.path.expanduser(cfg.student)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:
        raise PikvError(f"--student {cfg.student}: cannot load it as a causal LM ({brief(e)})")
    tok = None
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                   for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception:
            tok = None
    return model, tok


def check_compatible(model, student_tok, cache_attrs: dict) -> None:
    t_vocab = int(cache_attrs["teacher"]["vocab_size"])
    s_vocab = int(model.get_output_embeddings().weight.shape[0])
    if s_vocab < t_vocab:
        raise PikvError(f"the student's vocabulary ({s_vocab}) does not cover the teacher's ({t_vocab}); "
                        "the student must use the teacher's tokenizer (a larger, padded vocabulary is fine)")
    if student_tok is not None and tokenizer_hash(student_tok) != cache_attrs["tokenizer_sha256"]:
        raise PikvError("the student's tokenizer differs from the teacher's (tokenizer hash mismatch); "
                        "distillation needs the teacher's tokenizer, which the cache holds in its tokenizer/ folder")


def latest_checkpoint(out: str) -> str | None:
    found = [(int(p.rsplit("-", 1)[1]), p) for p in glob.glob(os.path.join(out, "checkpoint-*"))
             if p.rsplit("-", 1)[1].isdigit() and os.path.isfile(os.path.join(p, STATE_FILE))]
    return max(found)[1] if found else None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: str, student, cache, state: dict) -> None:
    """Atomic: everything goes to a temporary folder that is renamed into place at the end."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tok_dir = os.path.join(cache.path, cache.attrs.get("tokenizer_dir", "tokenizer"))
    for f in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, f), tmp)
    if state:
        torch.save(state, os.path.join(tmp, STATE_FILE))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _reduce(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch_dist.is_initialized():
        torch_dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: Distiller, cache, index, batch_size: int, d, autocast, top_k: int, t_index: int,
             rich: tuple = ()) -> dict:
    """Held-out CE, perplexity, KD loss, top-1 agreement with the teacher and each rich loss, over all ranks."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    top1 = n = 0.0
    for batch in D.eval_batches(cache, index, rank=d.rank, world_size=d.world_size, batch_size=batch_size,
                                top_k=top_k, t_index=t_index, rich=rich):
        b = {k: v.to(d.device) for k, v in batch.items() if k != "sample_id"}
        with autocast():
            losses, t_, n_ = model(**b)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        top1, n = top1 + float(t_), n + n_
    names = model.loss_names
    totals = _reduce([sums.get(k, 0.0) for k in names] + [top1, n], d.device)
    model.train(was_training)
    n = totals[-1]
    if n == 0:
        return {}
    got = dict(zip(names, totals))
    out = {"eval_ce": got["ce"] / n, "eval_ppl": math.exp(min(got["ce"] / n, 50)), "eval_kd": got["kd"] / n,
           "eval_top1": totals[-2] / n, "eval_tokens": int(n)}
    out.update({f"eval_{k}": got[k] / n for k in names[2:]})
    return out


def run(cfg: TrainConfig) -> dict:
    d = dist.init(cfg.device)
    try:
        return train(cfg, d)
    finally:
        dist.teardown()


def train(cfg: TrainConfig, d: dist.Dist) -> dict:
    """One training run in an initialised process group (a sweep runs several in one group)."""
    # ---- cache and targets ---------------------------------------------------------------------
    if not os.path.exists(cfg.cache):
        raise PikvError(f"--cache {cfg.cache} does not exist; create it with `pikv dump-teacher`")
    cache = open_cache(cfg.cache)
    top_k, t_index, tail = resolve_targets(cache, cfg.top_k, cfg.temperature, cfg.tail, cfg.divergence)
    index = D.CacheIndex(cache, cfg.eval_fraction)
    micro_per_epoch = D.micro_steps_per_epoch(len(index.train), cfg.batch_size, d.world_size)
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    global_batch = cfg.batch_size * cfg.grad_accum * d.world_size
    if steps_per_epoch == 0:
        raise PikvError(f"the cache has {len(index.train)} training sequences, fewer than one global batch of "
                        f"{global_batch} (batch-size x grad-accum x ranks); lower --batch-size or --grad-accum")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # ---- student, optimizer, resume --------------------------------------------------------------
    os.makedirs(cfg.out, exist_ok=True)
    ckpt = latest_checkpoint(cfg.out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise PikvError(f"--resume: {cfg.out} holds no checkpoint to resume from; drop --resume to start fresh")
    state = torch.load(os.path.join(ckpt, STATE_FILE), weights_only=False) if ckpt else None
    if state:
        if state["world_size"] != d.world_size:
            raise PikvError(f"--resume: the checkpoint was written by {state['world_size']} ranks, this run has "
                            f"{d.world_size}; resume with the same number of ranks")
        if state["data_order"] != cfg.data_order() or state["cache_key"] != cache.attrs["cache_key"]:
            raise PikvError("--resume: the cache or a setting that fixes the data order (seed, batch size, "
                            "grad accum, eval fraction) changed since the checkpoint; use a new --out")
    model, student_tok = load_student(cfg, cfg.seed)
    check_compatible(model, student_tok, cache.attrs)
    if state:  # the checkpoint's weights, through from_pretrained so tied weights load as saved
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model.config.use_cache = False
    model.to(d.device).train()
    pairs = resolve_pairs(cache, model, {kind: getattr(cfg, w) for w, kind in RICH_WEIGHTS.items()}, cfg.layer_map)
    rich = tuple(a for a in cache.rich if any(a.kind == p.kind and a.layer == p.t for p in pairs))  # arrays to read
    frozen = freeze(model, cfg.freeze)
    torch.manual_seed(cfg.seed)  # the projections' initialisation
    distiller = Distiller(model, temperature=cfg.temperature, divergence=cfg.divergence, tail=tail,
                          loss_chunk=cfg.loss_chunk, kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight,
                          rel_error=cache.relative_error, draws=cache.tail, pairs=pairs, targets=cache.attrs["targets"],
                          feature_loss=cfg.feature_loss).to(d.device)
    if state:
        distiller.proj.load_state_dict(state["projections"])
    weights = {"kd": cfg.kd_weight, "ce": cfg.ce_weight,
               **{LOSS_NAMES[kind]: getattr(cfg, flag) for flag, kind in RICH_WEIGHTS.items()}}
    names = distiller.loss_names
    # Without KD and CE the LM head (and layers above the last mapped one) get no gradient.
    ddp = torch.nn.parallel.DistributedDataParallel(
        distiller, find_unused_parameters=not (cfg.kd_weight or cfg.ce_weight)) if d.world_size > 1 else None
    net = ddp or distiller

    decay = [p for p in distiller.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in distiller.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.zero and d.world_size > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=cfg.lr, betas=(0.9, 0.95))
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total))
    amp_dtype = resolve_dtype(cfg.dtype, d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp_dtype == torch.float16)

    def autocast():
        if amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(d.device.type, dtype=amp_dtype)

    step, epoch, micro, skipped, tokens_seen = 0, 0, 0, 0, 0
    torch.manual_seed(cfg.seed + d.rank)
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, micro = state["step"], state["epoch"], state["micro"]
        skipped, tokens_seen = state["skipped"], state["tokens_seen"]
        set_rng_state(state["rng"][d.rank])
        dist.print0(f"resuming from {ckpt} at step {step}")

    def loader(ep: int, start: int):
        stream = D.TrainStream(cfg.cache, index, seed=cfg.seed, epoch=ep, start=start, batch_size=cfg.batch_size,
                               rank=d.rank, world_size=d.world_size, top_k=top_k, t_index=t_index, rich=rich)
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                                                pin_memory=d.device.type == "cuda",
                                                prefetch_factor=4 if cfg.num_workers else None))

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    metrics = open(metrics_path, "a") if d.is_main else None
    tb = wb = None
    try:  # every rank imports, so a missing package stops all ranks rather than hanging the others
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
        if cfg.wandb:
            import wandb
    except ImportError as e:
        raise PikvError(f"--tensorboard / --wandb need their package ({brief(e)}): pip install tensorboard "
                        "or pip install wandb (WANDB_MODE=offline works without a network)")
    if d.is_main and cfg.tensorboard:
        tb = SummaryWriter(os.path.join(cfg.out, "tensorboard"))
    if d.is_main and cfg.wandb:
        wb = wandb.init(project="pikv-offline", dir=cfg.out, config=cfg.to_dict(), resume="allow")
    if d.is_main:
        json.dump({**cfg.to_dict(), "world_size": d.world_size, "total_steps": total, "top_k": top_k, "tail_mode": tail,
                   "cache_key": cache.attrs["cache_key"]}, open(os.path.join(cfg.out, "config.json"), "w"), indent=2)

    def log(record: dict) -> None:
        if not d.is_main:
            return
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, record["step"])
        if wb:
            wb.log(record, step=record["step"])

    def checkpoint(name: str, with_state: bool) -> None:
        if cfg.zero and d.world_size > 1 and with_state:
            opt.consolidate_state_dict(to=0)
        rngs = dist.all_gather_object(rng_state())
        if d.is_main:
            st = {"step": step, "epoch": epoch, "micro": micro, "skipped": skipped, "tokens_seen": tokens_seen,
                  "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                  "rng": rngs, "world_size": d.world_size, "data_order": cfg.data_order(),
                  "cache_key": cache.attrs["cache_key"], "config": cfg.to_dict(),
                  "projections": distiller.proj.state_dict()} if with_state else None
            save_checkpoint(os.path.join(cfg.out, name), model, cache, st)
        dist.barrier()

    # ---- the loop ---------------------------------------------------------------------------------
    dist.print0(f"training {total} steps ({steps_per_epoch} per epoch) of {global_batch} sequences x "
                f"{cache.seq_len} tokens; KD {cfg.divergence}/{tail} at T={cfg.temperature}, k={top_k}"
                + (f" + {cache.tail} sampled" if tail == "sampled" else "")
                + "".join(f"; {p.kind} teacher layer {p.t} -> student layer {p.s}" for p in pairs)
                + (f"; {frozen} parameters frozen" if frozen else ""))
    it = loader(epoch, micro)
    bar = tqdm(total=total, initial=step, desc="train", disable=not d.is_main, dynamic_ncols=True)
    t_log, tok_log = time.perf_counter(), 0
    last, history = {}, []  # history: (wall time, loss tokens) after each step, for throughput figures
    while step < total:
        batches = []
        for _ in range(cfg.grad_accum):
            if micro >= steps_per_epoch * cfg.grad_accum:
                epoch, micro = epoch + 1, 0
                it = loader(epoch, micro)
            batches.append({k: v.to(d.device, non_blocking=True) for k, v in next(it).items() if k != "sample_id"})
            micro += 1
        local = sum(int(b["loss_mask"][:, 1:].sum()) for b in batches)
        (count,) = _reduce([local], d.device)
        sums = torch.zeros(len(names), dtype=torch.float64)
        for a, b in enumerate(batches):
            sync = contextlib.nullcontext() if ddp is None or a == len(batches) - 1 else ddp.no_sync()
            with sync:
                with autocast():
                    losses, _, _ = net(**b)
                    loss = sum(weights[k] * v for k, v in losses.items() if weights[k]) * (d.world_size / max(count, 1))
                scaler.scale(loss).backward()
            sums += torch.tensor([float(losses[k].detach()) for k in names], dtype=torch.float64)
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(distiller.parameters(), cfg.grad_clip or float("inf"))
        per = dict(zip(names, _reduce(sums.tolist(), d.device)))
        total_loss = sum(weights[k] * v for k, v in per.items()) / max(count, 1)
        finite = math.isfinite(total_loss) and math.isfinite(float(grad_norm))
        if finite:
            scaler.step(opt)
        else:
            skipped += 1
            dist.print0(f"step {step}: non-finite loss {total_loss} or grad norm {float(grad_norm)}; step skipped")
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        tokens_seen += int(count)
        tok_log += int(count)
        history.append((time.perf_counter(), int(count)))
        bar.update(1)
        last = {"step": step, "loss": total_loss, **{k: v / max(count, 1) for k, v in per.items()},
                "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                "skipped": skipped, "epoch": epoch}
        if step % max(cfg.log_every, 1) == 0 or step == total:
            now = time.perf_counter()
            last["tokens_per_s"] = tok_log / max(now - t_log, 1e-9)
            t_log, tok_log = now, 0
            bar.set_postfix(loss=f"{total_loss:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            log(last)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            ev = evaluate(distiller, cache, index, cfg.batch_size, d, autocast, top_k, t_index, rich)
            if ev:
                log({"step": step, **ev})
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            checkpoint(f"checkpoint-{step}", with_state=True)
    bar.close()
    ev = evaluate(distiller, cache, index, cfg.batch_size, d, autocast, top_k, t_index, rich)
    if ev:
        log({"step": step, **ev})
        dist.print0("eval: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items()))
    checkpoint(f"checkpoint-{step}", with_state=True)
    checkpoint("final", with_state=False)
    if metrics:
        metrics.close()
    if tb:
        tb.close()
    if wb:
        wb.finish()
    return {"steps": step, "skipped": skipped, "tokens_seen": tokens_seen, "last": last, "eval": ev,
            "out": cfg.out, "history": history}
