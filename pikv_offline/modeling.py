"""Model helpers both stages use: the LM head applied to hidden states, as the model's own forward does."""

from __future__ import annotations

import hashlib
import json

import torch


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``hidden`` (output of ``model.base_model``), model-specific transforms included.

    Running the head ourselves lets callers project only the positions they need, chunk by chunk.
    """
    head = model.get_output_embeddings()
    z = head(hidden.to(head.weight.device))
    c = text_config(model.config)
    scale = getattr(c, "logit_scale", None)  # Cohere
    if isinstance(scale, (int, float)) and scale != 1:
        z = z * scale
    cap = getattr(c, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        z = torch.tanh(z / cap) * cap
    return z


def tokenizer_hash(tokenizer) -> str:
    """Identity of what the ids mean: the vocabulary and the special tokens."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()),
               "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype to a torch dtype: auto is bf16 on a GPU that has it (else fp16), fp32 on CPU (exact,
    and faster there than emulated bf16)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
