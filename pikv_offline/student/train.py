"""Stage two: train a student from the teacher cache; the teacher is never loaded.

    pikv train-student --cache CACHE --student-config student.json --out RUN --max-steps 200
    torchrun --nproc-per-node 2 -m pikv_offline train-student --cache CACHE --student DIR --out RUN --epochs 1
    pikv train-student ... --ce-weight 1 --hidden-weight 1 --router-weight 0.1 --layer-map 4:2,8:4

Read top to bottom: set-up (cache, student, optimizer, resume), then one loop of optimizer steps.
Every loss is a sum over valid positions divided once by the step's global count of valid
positions (all micro-batches, all ranks); DDP averages gradients over ranks, so the loss is
multiplied by the world size to make that average a sum.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time

import torch
from tqdm import tqdm

from .. import dist, storage
from ..cache.reader import open_cache
from ..config import TrainConfig
from ..errors import PikvError, brief
from ..faults import fault
from ..modeling import resolve_dtype
from . import checkpoint
from . import data as D
from . import lora
from .distiller import Distiller, resolve_pairs
from .evaluate import evaluate
from .model import check_compatible, check_positions, freeze, load_student


MAX_BAD_STEPS = 10  # this many non-finite steps in a row stop the run instead of saving a broken student


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


def make_optimizer(cfg: TrainConfig, module: torch.nn.Module, world_size: int, total: int):
    """AdamW (ZeRO-sharded with --zero) over the trainable parameters, no decay on vectors; its LR schedule."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.zero and world_size > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=cfg.lr, betas=(0.9, 0.95))
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total))


class RunLog:
    """Rank 0's metrics.jsonl, with TensorBoard and W&B when asked; every other rank logs nothing."""

    def __init__(self, cfg: TrainConfig, d: dist.Dist):
        try:  # every rank imports, so a missing package stops all ranks rather than hanging the others
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
            if cfg.wandb:
                import wandb
        except ImportError as e:
            raise PikvError(f"--tensorboard / --wandb need their package ({brief(e)}): pip install tensorboard "
                            "or pip install wandb (WANDB_MODE=offline works without a network)")
        self.metrics = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if d.is_main else None
        self.tb = SummaryWriter(os.path.join(cfg.out, "tensorboard")) if d.is_main and cfg.tensorboard else None
        self.wb = wandb.init(project="pikv-offline", dir=cfg.out, config=cfg.to_dict(), resume="allow") \
            if d.is_main and cfg.wandb else None

    def __call__(self, record: dict) -> None:
        if self.metrics is None:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if self.wb:
            self.wb.log(record, step=record["step"])

    def close(self) -> None:
        for h in (self.metrics, self.tb):
            if h:
                h.close()
        if self.wb:
            self.wb.finish()


def forward_backward(net, ddp, batches: list, weights: dict, names: list[str], scale: float, scaler,
                     autocast) -> list[float]:
    """Forward and backward of one step's micro-batches (DDP syncs gradients on the last one only) of
    the weighted loss sum times ``scale`` (world size / the step's global count). Returns the per-loss sums."""
    sums = torch.zeros(len(names), dtype=torch.float64)
    for a, b in enumerate(batches):
        sync = contextlib.nullcontext() if ddp is None or a == len(batches) - 1 else ddp.no_sync()
        with sync:
            with autocast():
                losses, _, _ = net(b)
                loss = sum(weights[k] * v for k, v in losses.items() if weights[k]) * scale
            scaler.scale(loss).backward()
        sums += torch.tensor([float(losses[k].detach()) for k in names], dtype=torch.float64)
    return sums.tolist()


def check_cross(cfg: TrainConfig, model, student_tok, cache, more: list) -> None:
    """Refuses what cross-tokenizer KD cannot do: several teachers, a cache without a head, a student head
    smaller than its tokenizer, a --student folder of another tokenizer, a tokenizer whose token bytes cannot
    be read exactly (xtok.token_bytes)."""
    from transformers import AutoTokenizer

    from ..modeling import tokenizer_hash
    from .xtok import token_bytes

    if cache.top_k == 0:
        raise PikvError("--student-tokenizer: cross-tokenizer KD compares the teacher's top-k with the student's, and "
                        "this cache has none (dumped with --top-k 0); re-dump with --top-k 8 or more")
    if more:
        raise PikvError("--student-tokenizer with several --cache: cross-tokenizer KD takes one teacher")
    if not os.path.isdir(cfg.student_tokenizer):
        raise PikvError(f"--student-tokenizer {cfg.student_tokenizer}: not a folder; give the folder holding the "
                        "student's tokenizer (tokenizer.json)")
    try:
        tok = AutoTokenizer.from_pretrained(cfg.student_tokenizer, trust_remote_code=False)
    except Exception as e:
        raise PikvError(f"--student-tokenizer {cfg.student_tokenizer}: no tokenizer loads from it ({brief(e)})")
    token_bytes(tok)
    if tok.eos_token_id is None:
        raise PikvError(f"--student-tokenizer {cfg.student_tokenizer} has no EOS token, which marks the teacher's "
                        "document boundaries in the student's tokens; give it one (eos_token)")
    try:  # the cache's tokenizer spells the text: checked here, not at the first batch
        token_bytes(AutoTokenizer.from_pretrained(cache.tokenizer_path, trust_remote_code=False))
    except PikvError as e:
        raise PikvError(f"--student-tokenizer: the cache's (teacher's) tokenizer: {e}")
    if student_tok is not None and tokenizer_hash(student_tok) != tokenizer_hash(tok):
        raise PikvError(f"--student {cfg.student} holds another tokenizer than --student-tokenizer "
                        f"{cfg.student_tokenizer}; give the student's own tokenizer folder (or the --student folder)")
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if vocab < len(tok):
        raise PikvError(f"--student-tokenizer has {len(tok)} tokens but the student's head only {vocab}; give the "
                        f"student a vocab_size of at least {len(tok)}")


def run(cfg: TrainConfig, source=None) -> dict:
    d = dist.init(cfg.device)
    try:
        return train(cfg, d, source)
    finally:
        dist.teardown()


def train(cfg: TrainConfig, d: dist.Dist, source=None) -> dict:
    """One training run in an initialised process group (a sweep runs several in one group), holding
    --out for its life (a second run on it is refused).

    ``source(epoch, start)`` gives this rank's Batches of an epoch from global micro-step ``start``;
    by default they are read from the cache (data.train_batches). A bench may pass another source of
    the same batches (e.g. with targets computed live by a resident teacher)."""
    with checkpoint.out_lock(cfg.out, hold=d.is_main):
        return _train(cfg, d, source)


def _train(cfg: TrainConfig, d: dist.Dist, source) -> dict:
    # ---- cache, student, targets -------------------------------------------------------------------
    for path in cfg.cache:
        if not storage.exists(path):
            raise PikvError(f"--cache {path} does not exist; create it with `pikv dump-teacher`")
    # zarr-python here: TensorStore is not fork-safe, and the loader's worker is forked
    cache, *more = [open_cache(path) for path in cfg.cache]  # more: several teachers' further caches
    cache.check_tokenizer(cfg.trust_remote_code)  # checkpoints carry it
    index = D.CacheIndex(cache, cfg.eval_fraction)
    steps_per_epoch = D.micro_steps_per_epoch(len(index.train), cfg.batch_size, d.world_size) // cfg.grad_accum
    global_batch = cfg.batch_size * cfg.grad_accum * d.world_size
    if steps_per_epoch == 0:
        raise PikvError(f"the cache has {len(index.train)} training sequences, fewer than one global batch of "
                        f"{global_batch} (batch-size x grad-accum x ranks); lower --batch-size or --grad-accum")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    plan = D.plan_targets(cache, cfg.top_k, cfg.temperature, cfg.tail, cfg.divergence,
                          schedule=cfg.temperature_schedule, total_steps=total, cross=bool(cfg.student_tokenizer))
    others = D.plan_teachers(plan, cache, more, top_k=cfg.top_k, tail=cfg.tail, divergence=cfg.divergence,
                             schedule=cfg.temperature_schedule, total_steps=total)
    extra = tuple(zip(more, others))  # (Cache, TargetPlan) of each further teacher
    cache_key = checkpoint.joint_cache_key((cache, *more))  # a resume needs the same teachers

    ckpt = checkpoint.latest(cfg.out)
    if cfg.resume == "strict" and ckpt is None:
        raise PikvError(f"--resume: {cfg.out} holds no checkpoint to resume from; drop --resume to start fresh "
                        "(or use --resume auto)")
    if cfg.resume == "no" and ckpt is not None:  # a restart must not silently train over an earlier run
        raise PikvError(f"--out {cfg.out} holds checkpoints of an earlier run (latest {os.path.basename(ckpt)}); "
                        "pass --resume to continue it (--resume auto: continue when there is one), or choose "
                        "another --out")
    ckpt = ckpt if cfg.resume != "no" else None
    state = checkpoint.load(ckpt, world_size=d.world_size, data_order=cfg.data_order(),
                            cache_key=cache_key, cache_sequences=cache.n,
                            unit_seqs=cache.attrs.unit_seqs) if ckpt else None
    model, student_tok = load_student(cfg.student, cfg.student_config, cfg.seed, cfg.trust_remote_code)
    if cfg.student_tokenizer:  # cross-tokenizer KD: the student keeps its own vocabulary
        check_cross(cfg, model, student_tok, cache, more)
    else:
        check_compatible(model, student_tok, cache.attrs)
    check_positions(model, cache.seq_len)  # a cross-tokenizer student's sequences are capped at it too
    base = lora.base_fingerprint(model) if cfg.lora_rank else None  # the frozen base an adapter belongs to
    if state:
        checkpoint.check_same_run(state, ckpt, cfg, base, plan.tail, cache.top_k)
    if state and not cfg.lora_rank:
        model = checkpoint.load_student(ckpt, cfg.trust_remote_code)
    model.config.use_cache = False
    model.to(d.device).train()
    weights = cfg.loss_weights()
    pairs = resolve_pairs(cache, model, weights, cfg.layer_map)
    if pairs and cfg.student_tokenizer:
        raise PikvError("--student-tokenizer with rich losses (--hidden-weight etc.): the teacher's per-token targets "
                        "do not line up with the student's tokens; drop the rich weights")
    plan = dataclasses.replace(plan, rich=tuple(  # the rich arrays the losses use
        a for a in cache.rich if any(a.kind == p.kind and a.layer == p.t for p in pairs)))
    frozen = freeze(model, cfg.freeze)

    # ---- the trained module, optimizer, resume ------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the adapter's and the projections' initialisation
    adapter = lora.attach(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) if cfg.lora_rank else None
    if adapter is not None and state:
        lora.load_adapter(adapter, ckpt, (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets), state.get("config"))
    distiller = Distiller(model, plan, weights=weights, loss_chunk=cfg.loss_chunk, divergence=cfg.divergence,
                          pairs=pairs, targets=cache.attrs.targets, feature_loss=cfg.feature_loss, others=others,
                          teacher_weights=cfg.teacher_weights,
                          cross=(cfg.cross_loss or "match") if cfg.student_tokenizer else None).to(d.device)
    if state:
        distiller.proj.load_state_dict(state["projections"])
    names = distiller.loss_names
    # Without KD and CE the LM head (and layers above the last mapped one) get no gradient.
    ddp = torch.nn.parallel.DistributedDataParallel(
        distiller, find_unused_parameters=not (cfg.kd_weight or cfg.ce_weight)) if d.world_size > 1 else None
    net = ddp or distiller
    opt, sched = make_optimizer(cfg, distiller, d.world_size, total)
    amp_dtype = resolve_dtype(cfg.dtype, d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp_dtype == torch.float16)
    autocast = (lambda: contextlib.nullcontext()) if amp_dtype == torch.float32 else \
        (lambda: torch.autocast(d.device.type, dtype=amp_dtype))

    torch.manual_seed(cfg.seed + d.rank)
    at = checkpoint.restore(state, rank=d.rank, opt=opt, sched=sched, scaler=scaler) if state else checkpoint.Progress()
    if state:
        dist.print0(f"resuming from {ckpt} at step {at.step}")
        before = state.get("total_steps")
        if before not in (None, total) and cfg.schedule != "constant" and at.step < total:
            dist.print0(f"note: this run has {total} steps, the checkpoint's had {before}: the {cfg.schedule} "
                        f"schedule now spans {total} steps, so steps after {at.step} differ from the earlier plan")
        if before not in (None, total) and cfg.temperature_schedule and at.step < total:
            dist.print0(f"note: this run has {total} steps, the checkpoint's had {before}: the temperature schedule "
                        f"now spans {total} steps, so the temperatures after step {at.step} differ from the earlier "
                        "plan")
    save = functools.partial(checkpoint.write, d=d, model=model, distiller=distiller, opt=opt, sched=sched,
                             scaler=scaler, cache=cache, cache_key=cache_key, cfg=cfg,
                             tokenizer_dir=cfg.student_tokenizer or cache.tokenizer_path, total=total, adapter=adapter,
                             lora_base=base, tail_mode=plan.tail, tokenizer_links=bool(cfg.student_tokenizer))

    log = RunLog(cfg, d)
    if d.is_main:
        json.dump({**cfg.to_dict(), "world_size": d.world_size, "total_steps": total, "top_k": plan.top_k,
                   "tail_mode": plan.tail, "cache_key": cache_key},
                  open(os.path.join(cfg.out, "config.json"), "w"), indent=2)
    source = source or D.train_batches(cfg.cache[0], index, plan, seed=cfg.seed, batch_size=cfg.batch_size,
                                       rank=d.rank, world_size=d.world_size, grad_accum=cfg.grad_accum,
                                       num_workers=cfg.num_workers, pin_memory=d.device.type == "cuda",
                                       reader=cfg.reader, extra=tuple((c.path, p) for c, p in extra),
                                       student_tokenizer=cfg.student_tokenizer)
    held_out = lambda: D.eval_batches(cache, index, plan, rank=d.rank, world_size=d.world_size,  # noqa: E731
                                      batch_size=cfg.batch_size, extra=extra,
                                      student_tokenizer=cfg.student_tokenizer)

    # ---- the loop ---------------------------------------------------------------------------------
    dist.print0(f"training {total} steps ({steps_per_epoch} per epoch) of {global_batch} sequences x "
                f"{cache.seq_len} tokens; KD "
                + (f"{cfg.cross_loss or 'match'} across tokenizers (the student's own tokens)"
                   if cfg.student_tokenizer else
                   f"{cfg.divergence}/{plan.tail}") + " at T="
                + (f"{plan.temperature_at(0):g}->{plan.temperature:g} ({plan.schedule[2]})" if plan.schedule
                   else f"{plan.temperature}") + f", k={plan.top_k}"
                + (f" + {plan.draws} sampled" if plan.tail == "sampled" else "")
                + "".join(f"; teacher {j + 1} weight {w:g}: {c.path} ({p.tail}, k={p.top_k})" for j, (c, p, w) in
                          enumerate(zip((cache, *more), (plan, *others), distiller.teacher_weights)) if more)
                + "".join(f"; {p.kind} teacher layer {p.t} -> student layer {p.s}" for p in pairs)
                + (f"; {frozen} parameters frozen" if frozen else "")
                + ("; LoRA rank {}: {:,} of {:,} parameters train (adapters and projections)".format(
                    cfg.lora_rank, *lora.trainable(distiller)) if adapter is not None else ""))
    it = source(at.epoch, at.micro)
    bad_run, first_step = 0, at.step  # consecutive skipped steps; where this process started
    bar = tqdm(total=total, initial=at.step, desc="train", disable=not d.is_main, dynamic_ncols=True)
    t_log, tok_log = time.perf_counter(), 0
    last, history = {}, []  # history: (wall time, loss tokens) after each step, for throughput figures
    while at.step < total:
        batches = []
        for _ in range(cfg.grad_accum):
            if at.micro >= steps_per_epoch * cfg.grad_accum:
                at.epoch, at.micro = at.epoch + 1, 0
                it = source(at.epoch, at.micro)
            batch = next(it)
            if isinstance(batch, D.StreamError):
                raise PikvError(batch.message)
            batches.append(batch.to(d.device, non_blocking=True))
            at.micro += 1
        (count,) = dist.all_reduce_sum([sum(b.loss_tokens for b in batches)], d.device)
        sums = forward_backward(net, ddp, batches, weights, names, d.world_size / max(count, 1), scaler, autocast)
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(distiller.parameters(), cfg.grad_clip or float("inf"))
        per = dict(zip(names, dist.all_reduce_sum(sums, d.device)))
        total_loss = sum(weights[k] * v for k, v in per.items()) / max(count, 1)
        if math.isfinite(total_loss) and math.isfinite(float(grad_norm)):
            scaler.step(opt)
            bad_run = 0
        else:
            at.skipped, bad_run = at.skipped + 1, bad_run + 1
            dist.print0(f"step {at.step}: non-finite loss {total_loss} or grad norm {float(grad_norm)}; step skipped")
            if bad_run >= min(MAX_BAD_STEPS, total - first_step):
                raise PikvError(f"{bad_run} steps in a row (up to step {at.step}) had a non-finite loss or gradient: "
                                f"the run diverged (--lr {cfg.lr:g}); lower --lr or check the student and the cache. "
                                "No final/ was written")
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        at.step += 1
        at.tokens_seen += int(count)
        tok_log += int(count)
        history.append((time.perf_counter(), int(count)))
        bar.update(1)
        last = {"step": at.step, "loss": total_loss, **{k: v / max(count, 1) for k, v in per.items()},
                "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm), "skipped": at.skipped, "epoch": at.epoch,
                "temperature": plan.temperature if batches[0].temperature is None else batches[0].temperature}
        if at.step % max(cfg.log_every, 1) == 0 or at.step == total:
            now = time.perf_counter()
            last["tokens_per_s"] = tok_log / max(now - t_log, 1e-9)
            t_log, tok_log = now, 0
            bar.set_postfix(loss=f"{total_loss:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            log(last)
        if cfg.eval_every and at.step % cfg.eval_every == 0 and at.step < total:
            ev = evaluate(distiller, held_out(), d, autocast)
            if ev:
                log({"step": at.step, **ev})
        if cfg.save_every and at.step % cfg.save_every == 0 and at.step < total:
            save(os.path.join(cfg.out, f"checkpoint-{at.step}"), progress=at)
        fault("step", at.step)
    bar.close()
    if not all(bool(torch.isfinite(p).all()) for p in distiller.parameters()):
        raise PikvError(f"the trained weights hold non-finite values after step {at.step} (a damaged checkpoint or a "
                        f"diverged run, --lr {cfg.lr:g}); no final/ was written")
    # The last checkpoint before the final eval: a held-out row found damaged there loses no step (--resume
    # after the repair runs the eval alone).
    save(os.path.join(cfg.out, f"checkpoint-{at.step}"), progress=at)
    ev = evaluate(distiller, held_out(), d, autocast)
    if ev:
        log({"step": at.step, **ev})
        dist.print0("eval: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items()))
    save(os.path.join(cfg.out, "final"), progress=None)
    log.close()
    return {"steps": at.step, "skipped": at.skipped, "tokens_seen": at.tokens_seen, "last": last, "eval": ev,
            "out": cfg.out, "history": history}
