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


def code_refused(e: Exception, flag: str, name: str) -> str | None:
    """The one line for transformers' refusal to run the code ``name`` (given as ``flag``) ships, or None
    when ``e`` is another failure."""
    if "trust_remote_code" not in str(e):
        return None
    return (f"{flag} {name} ships its own code (an auto_map in its config), which pikv runs only with "
            "--trust-remote-code: read that code first, then pass the flag")


def refuse_adapter_folder(path: str, flag: str) -> None:
    """A folder with a peft adapter_config.json is an adapter, not a model: transformers would load the base
    named inside it (a stored path or hub id), so it is refused rather than followed."""
    import os

    from .errors import PikvError

    if os.path.isfile(os.path.join(os.path.expanduser(path), "adapter_config.json")):
        raise PikvError(f"{flag} {path} holds a LoRA adapter (adapter_config.json), not a model; give the merged "
                        "student of that run, RUN/final")


def load_error(e: Exception, flag: str, name: str, what: str) -> str:
    """The one line for a model or config that did not load from ``name`` (given as ``flag``)."""
    from .errors import brief

    return code_refused(e, flag, name) or f"{flag} {name}: {what} ({brief(e)})"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype to a torch dtype: auto is bf16 on a GPU that has it (else fp16), fp32 on CPU (exact,
    and faster there than emulated bf16)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# ---- where a model keeps its layers, routers and MoE blocks (rich targets, make-student, --freeze) -----

def layer_count(config) -> int | None:
    c = text_config(config)
    return getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)


def hidden_width(config) -> int:
    return int(text_config(config).hidden_size)


def kv_shape(config) -> tuple[int, int]:
    """(KV heads, head dim) of the attention cache, from the config."""
    c = text_config(config)
    heads = int(c.num_attention_heads)
    return int(getattr(c, "num_key_value_heads", None) or heads), int(getattr(c, "head_dim", None) or c.hidden_size // heads)


def router_experts(router: torch.nn.Module) -> int:
    return int(getattr(router, "num_experts", 0) or router.weight.shape[0])


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, module list) of the model's decoder layers: the ModuleList as long as the
    config's layer count, found by walking the modules so one rule serves every family."""
    n = layer_count(model.config)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n and n:
            return name, m
    raise ValueError(f"no list of {n} decoder layers in {type(model).__name__}")


def _router_recorder(model):
    """(router class or class-name suffix, index of the logits in its output), from the model's own
    declaration of where router logits come from (transformers' _can_record_outputs), or None."""
    rec = (getattr(type(model.base_model), "_can_record_outputs", None) or {}).get("router_logits")
    if rec is None:
        return None
    if isinstance(rec, type):
        return rec, 0
    return (getattr(rec, "target_class", None) or getattr(rec, "class_name", None)), int(getattr(rec, "index", 0) or 0)


def moe_layers(model) -> dict[int, tuple[torch.nn.Module, torch.nn.Module, int]]:
    """{decoder layer index: (router module, its MoE block, index of the logits in the router output)}."""
    found = _router_recorder(model)
    if found is None or found[0] is None:
        return {}
    cls, index = found

    def is_router(m):
        return isinstance(m, cls) if isinstance(cls, type) else type(m).__name__.endswith(cls)

    _, layers = decoder_layers(model)
    out = {}
    for i, layer in enumerate(layers):
        for name, m in layer.named_modules():
            if name and is_router(m):
                parent = name.rpartition(".")[0]
                out[i] = (m, layer.get_submodule(parent) if parent else layer, index)
                break
    return out


MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "ffn", "moe")


def mlp_block(model, layer: int) -> torch.nn.Module:
    """The feed-forward block of a decoder layer: its MoE block when it has one, else its MLP."""
    moe = moe_layers(model)
    if layer in moe:
        return moe[layer][1]
    block = decoder_layers(model)[1][layer]
    for name in MLP_NAMES:
        if isinstance(getattr(block, name, None), torch.nn.Module):
            return getattr(block, name)
    raise ValueError(f"layer {layer} of {type(model).__name__} has no MLP block ({', '.join(MLP_NAMES)})")


class Capture:
    """Records rich targets during one forward of ``model``: hidden states after decoder layers,
    the keys/values the layers cache, router logits of MoE layers and MoE block (or MLP) outputs.

    ``wanted`` maps a kind to layer indices. Hooks stay registered until close(); before each
    forward, pass ``forward_kwargs()`` to the base model (a fresh cache when kv is wanted). Tensors
    keep their graph unless ``detach`` (the teacher's are detached; a student's carry gradients).
    """

    def __init__(self, model, wanted: dict[str, tuple[int, ...]], detach: bool = True):
        self.model, self.detach, self.wanted = model, detach, wanted
        self.kv_layers = tuple(wanted.get("kv", ()))
        self.out: dict[tuple[str, int], torch.Tensor] = {}
        self._hooks = []
        _, layers = decoder_layers(model)
        moe = moe_layers(model) if wanted.get("router") else {}
        for layer in wanted.get("hidden", ()):
            self._hook(layers[layer], ("hidden", layer))
        for layer in wanted.get("experts", ()):
            self._hook(mlp_block(model, layer), ("experts", layer))
        for layer in wanted.get("router", ()):
            router, _, index = moe[layer]
            self._hook(router, ("router", layer), index)
        self.cache = None

    def _hook(self, module, key, index: int = 0):
        def hook(_module, _inputs, output):
            t = output[index] if isinstance(output, (tuple, list)) else output
            self.out[key] = t.detach() if self.detach else t
        self._hooks.append(module.register_forward_hook(hook))

    def forward_kwargs(self) -> dict:
        self.out = {}
        if not self.kv_layers:
            return {"use_cache": False}
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        return {"use_cache": True, "past_key_values": self.cache}

    def collect(self, batch: int, length: int) -> dict[tuple, torch.Tensor]:
        """{(kind, layer[, 'key'|'value']): [B, L, ...]} of the last forward; kv as [B, L, heads, head_dim]."""
        got = {}
        for (kind, layer), t in self.out.items():
            got[(kind, layer)] = t.reshape(batch, length, *t.shape[-1:]) if kind == "router" else t.reshape(
                batch, length, -1)
        for layer in self.kv_layers:
            cached = self.cache.layers[layer]
            for part, t in (("key", cached.keys), ("value", cached.values)):
                if t.shape[2] != length:
                    raise ValueError(f"layer {layer} caches {t.shape[2]} of {length} positions (a sliding window); "
                                     "pick a full-attention layer for kv")
                t = t.transpose(1, 2)
                got[("kv", layer, part)] = t.detach() if self.detach else t
        return got

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
