"""LoRA students through peft: only the adapters (and the rich losses' projections) train.

    pikv train-student --cache CACHE --student DIR --out RUN --max-steps 200 --lora-rank 16 [--lora-alpha 32]

A checkpoint holds the adapter alone (adapter_model.safetensors + adapter_config.json, peft's own format)
and the fingerprint of the frozen base it belongs to; RUN/final/ is the merged model, which
AutoModelForCausalLM.from_pretrained loads without peft, with the adapter beside it in final/adapter/.
peft injects the adapters into the Hugging Face model in place, so the Distiller, the fused loss and
the rich losses' captures see an ordinary model whose layers now carry LoRA branches.
"""

from __future__ import annotations

import hashlib
import os

import torch

from ..errors import PikvError, brief

ADAPTER_DIR = "adapter"  # final/adapter/: from_pretrained(final/) must not find an adapter_config.json at its top
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def base_fingerprint(model) -> str:
    """sha256 of the model's weights (names, shapes, bytes): which frozen base an adapter belongs to."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def attach(model, rank: int, alpha: float | None, targets: str):
    """The peft model around ``model`` with a fresh rank-``rank`` adapter on ``targets`` (module names,
    comma-separated, or all-linear: every linear layer but the output head). Refuses targets the model lacks."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise PikvError(f"--lora-rank needs peft ({brief(e)}): pip install peft")
    names = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if names != "all-linear":
        missing = [t for t in names if t not in leaves]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _width(m)})
            raise PikvError(f"--lora-targets: the student has no module named {missing[0]!r}; its linear layers are "
                            f"{', '.join(linear)} (or use all-linear)")
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    shared = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head or m is embed}
    if tied and names != "all-linear" and shared & set(names):
        raise PikvError(f"--lora-targets {','.join(sorted(shared & set(names)))}: the student ties its LM head to its "
                        "input embeddings, so an adapter there cannot be merged into one of the two; target other "
                        "layers (all-linear leaves the head out)")
    widths = {n: _width(m) for n, m in model.named_modules() if _width(m) and m is not head and (
        names != "all-linear" and n.rsplit(".", 1)[-1] in names or
        names == "all-linear" and not isinstance(m, torch.nn.Embedding))}
    # Above one narrow layer's width (a one-wide MoE gate) the adapter is only over-parameterized there; above
    # every layer's it can reach nothing a lower rank could not.
    if widths and rank > max(widths.values()):
        raise PikvError(f"--lora-rank {rank} is above the widths of the layers it adapts (at most "
                        f"{max(widths.values())}): a rank-r update of an m x n matrix has rank at most min(m, n); "
                        "lower --lora-rank")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=names,
                        lora_dropout=0.0, bias="none")
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError) as e:
        raise PikvError(f"--lora-targets {targets}: peft cannot put an adapter there ({brief(e)})")


def _width(module) -> int:
    """min(in, out) of a layer peft can adapt as a matrix: torch Linear, GPT-2's Conv1D, an embedding; else 0."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return min(module.in_features, module.out_features)
    if isinstance(module, (Conv1D, torch.nn.Embedding)):
        return min(module.weight.shape)
    return 0


def trainable(module) -> tuple[int, int]:
    """(trainable, all) parameter counts of ``module`` (the Distiller: student, adapters, projections)."""
    return (sum(p.numel() for p in module.parameters() if p.requires_grad),
            sum(p.numel() for p in module.parameters()))


def save_adapter(adapter, folder: str) -> None:
    # the adapter alone: peft would add a whole base embedding / LM head matrix beside an adapter on one,
    # and a resume would then load base weights from the checkpoint (the base's own are the fingerprinted ones)
    adapter.save_pretrained(folder, save_embedding_layers=False)
    readme = os.path.join(folder, "README.md")  # peft's model card template: nothing a user needs here
    if os.path.isfile(readme):
        os.remove(readme)


def save_merged(adapter, folder: str) -> None:
    """final/: the adapter in final/adapter/, then the merged model. Merges in place: the run is over."""
    save_adapter(adapter, os.path.join(folder, ADAPTER_DIR))
    merged = adapter.merge_and_unload()
    if not all(bool(torch.isfinite(p).all()) for p in merged.parameters()):  # huge finite A, B can overflow W + BA
        raise PikvError("the merged student holds non-finite weights (base + adapter overflows float32); no final/ "
                        "was written")
    merged.save_pretrained(folder)


def load_adapter(adapter, ckpt: str, settings: tuple, saved_config: dict | None) -> None:
    """The checkpoint's adapter weights into ``adapter``: the same (rank, alpha, targets) ``settings`` as
    the checkpoint's run config and the same names and shapes as this run's adapter, or a clear refusal."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    def same(s):  # alpha as resolved (default 2 x rank), targets as a set
        rank, alpha, targets = s
        try:
            alpha = float(alpha) if alpha is not None else 2.0 * float(rank)
        except (TypeError, ValueError):  # a damaged config: compared as it is, so refused
            pass
        if isinstance(targets, str) and targets != "all-linear":
            targets = tuple(sorted({x.strip() for x in targets.split(",") if x.strip()}))
        return rank, alpha, targets

    if isinstance(saved_config, dict):
        before = tuple(saved_config.get(k) for k in ("lora_rank", "lora_alpha", "lora_targets"))
        if same(before) != same(settings):  # alpha scales the update: the same weights would be another model
            raise PikvError(f"--resume: the checkpoint in {ckpt} was trained with --lora-rank/--lora-alpha/"
                            f"--lora-targets {before}, this run asks for {settings}; resume with the checkpoint's "
                            "settings or use a new --out")

    path = os.path.join(ckpt, ADAPTER_WEIGHTS)
    try:
        stored = load_file(path)
    except Exception as e:
        raise PikvError(f"--resume: {path} is not a readable adapter ({brief(e)}); remove that checkpoint or use a "
                        "new --out")
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(adapter, save_embedding_layers=False).items()}
    have = {k: tuple(v.shape) for k, v in stored.items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise PikvError(f"--resume: the adapter in {ckpt} does not match this run's --lora-rank / --lora-targets "
                        f"(first difference: {diff[0]}); resume with the checkpoint's settings or use a new --out")
    if any(v.dtype != torch.float32 for v in stored.values()):
        raise PikvError(f"--resume: the adapter in {ckpt} is not float32 (pikv writes float32 adapters); it was not "
                        "written by this run: remove that checkpoint or use a new --out")
    if not all(torch.isfinite(v).all() for v in stored.values()):
        raise PikvError(f"--resume: the adapter in {ckpt} holds non-finite weights; remove that checkpoint")
    set_peft_model_state_dict(adapter, stored)
