"""Load a Hugging Face teacher and its tokenizer, identify them, and compute logit targets."""

from __future__ import annotations

import hashlib
import os

import torch

from ..dist import print0
from ..errors import PikvError, brief
from ..cache import format as F
from ..modeling import (Capture, code_refused, hidden_width, kv_shape, layer_count, lm_logits, load_error,
                        moe_layers, refuse_adapter_folder, router_experts, text_config)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_PROBE = 4 << 20  # bytes hashed at each end of a weight file


def resolve_teacher(teacher: str) -> str:
    """A local folder holding the teacher: the path itself, or the hub snapshot (offline cache included)."""
    path = os.path.expanduser(teacher)
    if os.path.isdir(path):
        refuse_adapter_folder(path, "--teacher")
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


def load_tokenizer(folder: str, teacher: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise PikvError(code_refused(e, "--teacher", teacher) or f"--teacher {teacher} has no usable tokenizer "
                        f"({brief(e)}); save one beside the weights with tokenizer.save_pretrained")


def load_config(folder: str, teacher: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise PikvError(load_error(e, "--teacher", teacher, "cannot read its config.json"))
    if getattr(config, "auto_map", None) and not trust_remote_code:  # transformers falls back to its own class
        print0(f"note: --teacher {teacher} ships model code (auto_map) that is not run; transformers' own "
               f"{config.model_type} classes are used (pass --trust-remote-code to run the shipped code)")
    return config


def context_length(config) -> int | None:
    c = text_config(config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(c, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def load_model(folder: str, teacher: str, dtype: torch.dtype, device: torch.device, device_map: str | None,
               trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    try:
        kwargs = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:
        raise PikvError(load_error(e, "--teacher", teacher, "cannot load it as a causal LM"))
    if not device_map:
        model.to(device)
    return model.eval()


@torch.inference_mode()
def logit_targets(model, input_ids: torch.Tensor, top_k: int, temperatures: tuple[float, ...],
                  uniforms: torch.Tensor | None = None, chunk_tokens: int | None = None,
                  forward_kwargs: dict | None = None, tail_temperatures=(1.0,)) -> dict[str, torch.Tensor]:
    """The teacher's logit targets for input_ids [B, L], all float32 / int64 on the model's device.

    - ``ids``, ``logprobs`` [B, L, k]: the top-k, most probable first, log-softmax at T=1;
    - ``tnorm`` [B, L, nT]: log sum_v p_1(v)^(1/T) over the FULL vocabulary per grid T, so that
      log p_T(v) = log p_1(v) / T - tnorm_T exactly (tnorm_1 = 0);
    - with ``uniforms`` [B, L, n] in [0, 1): ``tail_ids``, ``tail_logprobs`` [B, L, n] (T=1 log-probs),
      n draws with replacement from the teacher restricted to the ids outside the top-k, slot j at the
      temperature tail_temperatures[j mod m] (each one in ``temperatures``; format.tail_slot_temperatures).
      Inverse-CDF sampling, so the caller's uniforms fix the draws on any device and batch split.

    The LM head runs on ``chunk_tokens`` positions at a time so a [B, L, V] float32 tensor is
    never materialized: the peak extra memory is two chunk_tokens x V float32 buffers (default:
    4096 positions, fewer at a large vocabulary so that a buffer stays near 256 MiB: 441 at V=152k).
    ``forward_kwargs`` go to the base model (a modeling.Capture's, to record rich targets on the way).
    """
    hidden = model.base_model(input_ids=input_ids, **(forward_kwargs or {"use_cache": False})).last_hidden_state
    b, length, width = hidden.shape
    flat = hidden.reshape(b * length, width)
    u = None if uniforms is None else uniforms.reshape(b * length, -1).to(flat.device)
    out: dict[str, list] = {"ids": [], "logprobs": [], "tnorm": [], "tail_ids": [], "tail_logprobs": []}
    buf = None
    slots_at = {} if u is None else tail_slots(tail_temperatures, u.shape[1], flat.device)
    if chunk_tokens is None:
        chunk_tokens = max(64, min(4096, (256 << 20) // (4 * model.get_output_embeddings().weight.shape[0])))
    for s in range(0, flat.shape[0], chunk_tokens):
        z = lm_logits(model, flat[s:s + chunk_tokens]).float()
        top, idx = torch.topk(z, top_k, dim=-1, sorted=True) if top_k else torch.max(z, -1, keepdim=True)
        # With m the row max, log sum exp(z/T) = m/T + log sum exp((z - m)/T); m cancels in
        # tnorm_T = lse_T - lse_1/T, so only shifted sums are needed. One shifted copy and one
        # reused buffer instead of torch.logsumexp per T: half the memory passes.
        shifted = z.sub_(top[:, :1])  # z is this chunk's own tensor
        if buf is None or buf.shape != shifted.shape:
            buf = torch.empty_like(shifted)
        logsums = []
        draws = None if u is None else torch.empty(z.shape[0], u.shape[1], dtype=torch.long, device=z.device)
        for t in temperatures:  # T=1 first: its sum is the lse1 every tail log-prob needs
            torch.mul(shifted, 1.0 / t, out=buf)
            logsums.append(buf.exp_().sum(dim=-1).log_())
            slots = slots_at.get(t)
            if slots is not None:  # buf holds exp((z - m) / t): sample the slots drawn at t
                draws[:, slots] = sample_tail(buf, idx[:, :top_k], u[s:s + chunk_tokens][:, slots])
        if draws is not None:
            lp = torch.gather(shifted, 1, draws.clamp(min=0)) - logsums[0][:, None]
            out["tail_ids"].append(draws)
            out["tail_logprobs"].append(lp.masked_fill_(draws < 0, 0.0))
        lse1 = logsums[0]
        out["tnorm"].append(torch.stack([ls - lse1 / t for ls, t in zip(logsums, temperatures)], -1))
        out["ids"].append(idx[:, :top_k])
        out["logprobs"].append(top[:, :top_k] - top[:, :1] - lse1[:, None])
    return {k: torch.cat(v).reshape(b, length, -1) for k, v in out.items() if v}


def tail_slots(tail_temperatures, draws: int, device) -> dict[float, torch.Tensor]:
    """Each proposal temperature -> the indices of the slots that draw at it (format.tail_slot_temperatures),
    on ``device``: found once, not per chunk of positions."""
    slot_t = F.tail_slot_temperatures(tail_temperatures, draws)
    return {t: torch.tensor([j for j, x in enumerate(slot_t) if x == t], device=device) for t in dict.fromkeys(slot_t)}


def sample_tail(e: torch.Tensor, head: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws [C, n] from e (unnormalized probabilities [C, V], overwritten) outside ``head``;
    -1 where the tail's mass underflows to 0 (a teacher that sure has no tail to estimate)."""
    e.scatter_(1, head, 0.0)
    cdf = e.cumsum_(dim=-1)
    total = cdf[:, -1:]
    # u < 1, but u * total can round up to total; nextafter keeps every target strictly inside,
    # so the first CDF entry above it has a positive step and is never a head id.
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    draws = torch.searchsorted(cdf, x.contiguous(), right=True).clamp_(max=e.shape[1] - 1)
    return draws.masked_fill_(total <= 0, -1)


def skeleton(config, trust_remote_code: bool = False):
    """The model's module tree on the meta device: where its layers and routers are, without weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def plan_targets(config, requests, teacher: str, trust_remote_code: bool = False) -> dict:
    """--targets requests (config.parse_targets) -> the ``targets`` root-attribute entries of the rich
    targets: layers resolved and checked against the teacher, shapes, encoding, int8 group."""
    if not requests:
        return {}
    model = skeleton(config, trust_remote_code)
    n = layer_count(config)
    moe = moe_layers(model)
    width = hidden_width(config)
    kv_heads, head_dim = kv_shape(config)
    out = {}
    for kind, layers, enc in requests:
        if kind in ("router", "experts") and not moe:
            raise PikvError(f"--targets {kind}: the teacher {teacher} ({config.model_type}) is dense, it has no MoE "
                            "router; ask for hidden or kv targets, or use a mixture-of-experts teacher")
        allowed = sorted(moe) if kind in ("router", "experts") else list(range(n))
        if layers is None:
            layers = allowed
        resolved = []
        for layer in layers:
            i = layer + n if layer < 0 else layer
            if not 0 <= i < n:
                raise PikvError(f"--targets {kind}: layer {layer} is out of range; the teacher has {n} layers (0..{n - 1})")
            if i not in allowed:
                raise PikvError(f"--targets {kind}: layer {i} of the teacher is not a MoE layer; its MoE layers are "
                                f"{allowed}")
            resolved.append(i)
        if len(set(resolved)) != len(resolved):
            raise PikvError(f"--targets {kind}: a layer is listed twice (negative indices count from the end)")
        if kind == "kv":
            shape, group = [kv_heads, head_dim], head_dim
        elif kind == "router":
            shape = [router_experts(moe[resolved[0]][0])]
            group = shape[0]
        else:
            shape, group = [width], F.int8_group(width) if enc == "int8" else width
        out[kind] = {"layers": sorted(resolved), "encoding": enc, "shape": shape, "group": group}
    return out


def open_capture(model, targets: dict, seq_len: int) -> Capture | None:
    """Hooks recording the rich targets of ``targets``; checks them on a probe forward of one sequence first,
    so a model whose tensors do not have the planned shapes (or a sliding-window layer's kv) fails before
    any shard is written."""
    wanted = {kind: tuple(targets[kind]["layers"]) for kind in F.RICH_KINDS if targets.get(kind)}
    if not wanted:
        return None
    cap = Capture(model, wanted)
    device = next(model.parameters()).device
    with torch.inference_mode():
        model.base_model(input_ids=torch.zeros((1, seq_len), dtype=torch.long, device=device), **cap.forward_kwargs())
        got = rich_targets(cap, 1, seq_len)
    for a in F.rich_arrays(targets):
        shape = tuple(got[a.name].shape[2:]) if a.name in got else None
        if shape != a.shape:
            cap.close()
            raise PikvError(f"--targets {a.kind}: layer {a.layer} of this {model.config.model_type} teacher gives "
                            f"{shape}, expected {a.shape} from its config; this target is not supported for it")
    return cap


def rich_targets(cap: Capture, batch: int, length: int) -> dict[str, torch.Tensor]:
    """The last forward's rich targets by array name, float32, [B, L, *shape]."""
    try:
        got = cap.collect(batch, length)
    except ValueError as e:
        raise PikvError(f"--targets kv: {e}")
    return {F.rich_name(*key): t.float() for key, t in got.items()}
