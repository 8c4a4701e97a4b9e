"""`pikv make-student`: a student initialised from some of the teacher's layers (DistilBERT-style).

    pikv make-student --teacher DIR --keep-layers 0,2,4,6 --out STUDENT
    pikv train-student --cache CACHE --student STUDENT --out RUN --hidden-weight 1 --freeze embeddings ...

The student has the teacher's config with fewer decoder layers, and copies the kept layers, the
embeddings, the final norm and the LM head. With every layer kept it is the teacher itself.
"""

from __future__ import annotations

import copy
import os
import shutil
import torch

from ..config import MakeStudentConfig
from ..errors import PikvError
from ..modeling import decoder_layers, layer_count, moe_layers, text_config
from ..teacher import model as M


def parse_keep(text: str, n: int) -> list[int]:
    try:
        keep = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PikvError(f"--keep-layers {text!r}: give comma-separated layer indices, e.g. 0,2,4")
    keep = [i + n if i < 0 else i for i in keep]
    if not keep or any(not 0 <= i < n for i in keep):
        raise PikvError(f"--keep-layers {text!r}: the teacher has layers 0..{n - 1}")
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise PikvError(f"--keep-layers {text!r}: list the layers once each, in increasing order")
    return keep


def student_config(teacher, keep: list[int]):
    """The teacher's config with the kept layers: per-layer lists cut to them, MoE placement preserved."""
    config = copy.deepcopy(teacher.config)
    c = text_config(config)
    n = layer_count(teacher.config)
    c.num_hidden_layers = len(keep)
    for name in ("layer_types", "sliding_window_pattern_list"):
        v = getattr(c, name, None)
        if isinstance(v, (list, tuple)) and len(v) == n:
            setattr(c, name, [v[i] for i in keep])
    moe = moe_layers(teacher)
    if moe and hasattr(c, "mlp_only_layers"):  # Qwen2/3-MoE: say which kept layers are dense
        c.mlp_only_layers = [j for j, i in enumerate(keep) if i not in moe]
        if hasattr(c, "decoder_sparse_step"):
            c.decoder_sparse_step = 1
    return config


def make(teacher, keep: list[int], trust_remote_code: bool = False):
    """A new model with the teacher's weights for the kept layers and everything outside the layers."""
    from transformers import AutoModelForCausalLM

    config = student_config(teacher, keep)
    student = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code).to(next(teacher.parameters()).dtype)
    t_moe, s_moe = set(moe_layers(teacher)), set(moe_layers(student))
    if s_moe != {j for j, i in enumerate(keep) if i in t_moe}:
        raise PikvError(f"--keep-layers: this {config.model_type} config cannot place the MoE layers of the kept "
                        f"teacher layers {keep}; keep layers of one kind or a pattern the config can express")
    prefix, _ = decoder_layers(student)
    source = teacher.state_dict()
    mapped = {}
    for key in student.state_dict():
        if key.startswith(prefix + "."):
            j, _, rest = key[len(prefix) + 1:].partition(".")
            key_t = f"{prefix}.{keep[int(j)]}.{rest}"
        else:
            key_t = key
        mapped[key] = source[key_t]
    student.load_state_dict(mapped, strict=True)
    return student


def run(cfg: MakeStudentConfig) -> dict:
    if os.path.exists(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
        raise PikvError(f"--out {cfg.out} exists and is not empty; choose another folder or pass --overwrite")
    folder = M.resolve_teacher(cfg.teacher)
    tokenizer = M.load_tokenizer(folder, cfg.teacher, cfg.trust_remote_code)
    config = M.load_config(folder, cfg.teacher, cfg.trust_remote_code)
    keep = parse_keep(cfg.keep_layers, layer_count(config))
    teacher = M.load_model(folder, cfg.teacher, torch.float32, torch.device("cpu"), None, cfg.trust_remote_code)
    student = make(teacher, keep, cfg.trust_remote_code)
    tmp = os.path.join(os.path.dirname(os.path.abspath(cfg.out)), f".tmp-{os.path.basename(cfg.out)}")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(cfg.out, ignore_errors=True)
    os.replace(tmp, cfg.out)
    n_params = sum(p.numel() for p in student.parameters())
    print(f"wrote {cfg.out}: {len(keep)} of {layer_count(config)} teacher layers ({keep}), {n_params} parameters")
    return {"out": cfg.out, "keep_layers": keep, "parameters": n_params}
