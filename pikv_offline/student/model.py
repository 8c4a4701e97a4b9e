"""The student side of models: load or build it, check it fits the cache, freeze parts of it."""

from __future__ import annotations

import json
import os

import torch

from ..errors import PikvError, brief
from ..modeling import decoder_layers, load_error, mlp_block, refuse_adapter_folder, tokenizer_hash


def load_student(student: str | None, student_config: str | None, seed: int, trust_remote_code: bool = False):
    """(model, its tokenizer or None): a fresh model from ``student_config`` (seeded) or ``student``'s weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if student_config:
        try:
            spec = json.load(open(student_config))
            config = AutoConfig.for_model(**spec)
        except Exception as e:
            raise PikvError(f"--student-config {student_config}: not a usable model config json ({brief(e)})")
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config), None
    path = os.path.expanduser(student)
    refuse_adapter_folder(path, "--student")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise PikvError(load_error(e, "--student", student, "cannot load it as a causal LM"))
    return model, load_tokenizer(path, trust_remote_code)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer a student folder holds, or None (none there, or none that loads)."""
    if not (os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:
        return None


def check_compatible(model, student_tok, cache_attrs) -> None:
    """Refuses a student whose vocabulary or tokenizer is not the teacher's (cache_attrs: layout.RootAttrs)."""
    t_vocab = int(cache_attrs.teacher["vocab_size"])
    s_vocab = int(model.get_output_embeddings().weight.shape[0])
    if s_vocab < t_vocab:
        raise PikvError(f"the student's vocabulary ({s_vocab}) does not cover the teacher's ({t_vocab}); "
                        "the student must use the teacher's tokenizer (a larger, padded vocabulary is fine)")
    if student_tok is not None and tokenizer_hash(student_tok) != cache_attrs.tokenizer_sha256:
        raise PikvError("the student's tokenizer differs from the teacher's (tokenizer hash mismatch); same-tokenizer "
                        "KD needs the teacher's, which the cache holds in its tokenizer/ folder (a student with its own "
                        "tokenizer: train-student --student-tokenizer DIR, eval --cross-tokenizer)")


def check_positions(model, seq_len: int) -> None:
    """Refuses a student with a learned position table shorter than the cache's sequences (GPT-2's wpe, OPT's
    embed_positions): it would index past its end. Rotary students have no table and extrapolate."""
    pos = getattr(model.base_model, "wpe", None) or getattr(model.base_model, "embed_positions", None)
    if isinstance(pos, torch.nn.Embedding):
        n = pos.num_embeddings - int(getattr(pos, "offset", 0) or 0)
        if n < seq_len:
            raise PikvError(f"the student has learned positions for {n} tokens but the cache's sequences have "
                            f"{seq_len}; give the student at least {seq_len} positions (n_positions / "
                            "max_position_embeddings in its config)")


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
