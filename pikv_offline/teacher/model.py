"""Load a Hugging Face teacher and its tokenizer, identify them, and compute logit targets."""

from __future__ import annotations

import hashlib
import os

import torch

from ..errors import PikvError, brief
from ..modeling import lm_logits, text_config

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_PROBE = 4 << 20  # bytes hashed at each end of a weight file


def resolve_teacher(teacher: str) -> str:
    """A local folder holding the teacher: the path itself, or the hub snapshot (offline cache included)."""
    path = os.path.expanduser(teacher)
    if os.path.isdir(path):
        return path
    if teacher.startswith((".", "/", "~")) or teacher.count("/") > 1:
        raise PikvError(f"--teacher folder {teacher} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(teacher, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                          "*.jinja", "*.tiktoken", "*.py"])
    except Exception as e:
        raise PikvError(f"--teacher {teacher!r} is not a local folder and could not be loaded from the hub "
                        f"(nor its offline cache): {brief(e)}")


def weights_identity(folder: str) -> str:
    """A cheap identity of the weights: size plus the first and last 4 MiB of every weight file.

    Hashing a 140 GB checkpoint in full would cost minutes per dump; the ends of each file hold
    the header and real tensor bytes, so a retrained or re-quantized model changes this hash.
    """
    h = hashlib.sha256()
    files = sorted(f for f in os.listdir(folder) if f.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise PikvError(f"--teacher {folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    for name in files:
        p = os.path.join(folder, name)
        size = os.path.getsize(p)
        h.update(f"{name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(_PROBE))
            if size > 2 * _PROBE:
                f.seek(size - _PROBE)
                h.update(f.read(_PROBE))
    return h.hexdigest()


def load_tokenizer(folder: str, teacher: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise PikvError(f"--teacher {teacher} has no usable tokenizer ({brief(e)}); save one beside the weights "
                        "with tokenizer.save_pretrained")


def load_config(folder: str, teacher: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise PikvError(f"--teacher {teacher}: cannot read its config.json ({brief(e)})")


def context_length(config) -> int | None:
    c = text_config(config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(c, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def layer_count(config) -> int | None:
    c = text_config(config)
    return getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)


def load_model(folder: str, teacher: str, dtype: torch.dtype, device: torch.device, device_map: str | None):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    try:
        kwargs = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except Exception as e:
        raise PikvError(f"--teacher {teacher}: cannot load it as a causal LM ({brief(e)})")
    if not device_map:
        model.to(device)
    return model.eval()


@torch.inference_mode()
def logit_targets(model, input_ids: torch.Tensor, top_k: int, temperatures: tuple[float, ...],
                  chunk_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids, top-k log-probs (T=1) and the full-vocabulary LSE at every T, all in float32.

    input_ids [B, L] -> ids [B, L, k] int64, logprobs [B, L, k] float32 (sorted, descending),
    lse [B, L, nT] float32 where lse[..., j] = log sum_v exp(z_v / T_j).

    The LM head runs on ``chunk_tokens`` positions at a time so a [B, L, V] float32 tensor is
    never materialized: the peak extra memory is chunk_tokens x V floats.
    """
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    b, length, width = hidden.shape
    flat = hidden.reshape(b * length, width)
    ids, lps, lses = [], [], []
    buf = None
    for s in range(0, flat.shape[0], chunk_tokens):
        z = lm_logits(model, flat[s:s + chunk_tokens]).float()
        top, idx = torch.topk(z, top_k, dim=-1, sorted=True)
        # LSE_T = m/T + log sum exp((z - m)/T) with m = the row max (= top[:, 0]). One shifted copy
        # and one reused buffer instead of torch.logsumexp per T: half the memory passes, same values.
        m = top[:, :1]
        shifted = z.sub_(m)  # z is this chunk's own tensor
        if buf is None or buf.shape != shifted.shape:
            buf = torch.empty_like(shifted)
        cols = []
        for t in temperatures:
            torch.mul(shifted, 1.0 / t, out=buf)
            cols.append(buf.exp_().sum(dim=-1).log_() + m[:, 0] / t)
        lse = torch.stack(cols, dim=-1)
        lps.append(top - lse[:, :1])
        ids.append(idx)
        lses.append(lse)
    return (torch.cat(ids).reshape(b, length, top_k), torch.cat(lps).reshape(b, length, top_k),
            torch.cat(lses).reshape(b, length, len(temperatures)))
