"""Cross-tokenizer KD from a cache: the student's own tokens of the teacher's text, the positions where both
predict the same next piece of text, and the Universal Logit Distillation loss at those positions.

    ids, mask, teacher_pos = retokenize(teacher_ids, teacher_mask, token_bytes(teacher_tok), student_tok, L)
    loss_sum, count = uld_loss(student_logits_at_aligned, head_logprobs, tnorm, temperature)

The cache holds the teacher's token ids; their bytes are exact (token_bytes: byte-level BPE as in GPT-2,
Llama 3, Qwen; SentencePiece-style pieces with byte fallback as in Llama 2, Mistral, Gemma), so the text is
known byte for byte without storing it. The student tokenizes that text; a student position t and a teacher
position u are aligned when the student's token t+1 and the teacher's token u+1 start at the same byte of
the same document: both then predict the next token after the same text prefix, so their next-token
distributions are comparable, though over different vocabularies.

ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for
LLMs", arXiv:2402.12030): with no matching between the two vocabularies, the Wasserstein-1 distance under a
cost of 1 between any two different tokens has the closed form of the L1 distance between the probability
vectors sorted in decreasing order,
    ULD(p, q) = sum_i | p_(i) - q_(i) |.
The cache keeps the teacher's top-k exactly (most probable first) and its tail mass P_T = 1 - sum_head p_T
(from the stored normalizer at T); the student's sorted top-k comes from its softmax at T. The sum is taken
over the k sorted values plus one term for the rest, | P_T - Q_T |: by the triangle inequality a lower bound
of the remaining terms, equal to them when each tail is concentrated at one value.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ..errors import PikvError


def _byte_level_decoder() -> dict[str, int]:
    """The printable stand-in of each byte used by byte-level BPE (GPT-2's bytes_to_unicode): bytes of
    printable Latin-1 stand for themselves, the others for chr(256 + n) in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + n)] = b
            n += 1
    return out


def _decoder_kinds(tokenizer) -> list[dict]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PikvError(f"cross-tokenizer KD needs a fast (Rust) tokenizer to read token bytes; "
                        f"{type(tokenizer).__name__} is not one")
    dec = json.loads(backend.to_str()).get("decoder") or {}
    return dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]


def token_bytes(tokenizer) -> list[bytes | None]:
    """The exact bytes of every token id; None for special tokens (document boundaries)."""
    kinds = {d.get("type") for d in _decoder_kinds(tokenizer)}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    out: list[bytes | None] = []
    if "ByteLevel" in kinds:
        table = _byte_level_decoder()
        for i, p in enumerate(pieces):
            if i in special or p is None:
                out.append(None)
            elif all(c in table for c in p):
                out.append(bytes(table[c] for c in p))
            else:  # an added (non-special) token stored as plain text
                out.append(p.encode("utf-8"))
        return out
    if "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
        for i, p in enumerate(pieces):
            if p is not None and len(p) == 6 and p.startswith("<0x") and p.endswith(">"):  # byte fallback
                out.append(bytes([int(p[3:5], 16)]))
            elif i in special or p is None:
                out.append(None)
            else:
                out.append(p.replace("\u2581", " ").encode("utf-8"))
        return out
    raise PikvError(f"cross-tokenizer KD reads token bytes of byte-level BPE or SentencePiece-style tokenizers; this "
                    f"one's decoder is {sorted(k for k in kinds if k) or 'none'}")


def _strip_partial(b: bytes) -> tuple[int, int]:
    """(lo, hi) such that b[lo:hi] drops an incomplete UTF-8 character at either end (packing cuts
    sequences at token boundaries, and a token may end inside a character)."""
    lo = 0
    while lo < len(b) and lo < 3 and 0x80 <= b[lo] < 0xC0:
        lo += 1
    hi = len(b)
    for back in range(1, min(4, hi - lo) + 1):  # the last lead byte and whether its character is complete
        c = b[hi - back]
        if c >= 0xC0:
            need = 2 if c < 0xE0 else 3 if c < 0xF0 else 4
            if back < need:
                hi -= back
            break
        if c < 0x80:
            break
    return lo, hi


def retokenize(teacher_ids: np.ndarray, teacher_mask: np.ndarray, table: list, student_tok, length: int):
    """One cached sequence in the student's tokens.

    Returns (ids [length] int64, mask [length] bool, teacher_pos [length] int64): the student's tokens of
    the same text (a teacher special token becomes the student's EOS), padded with the student's pad id;
    the loss mask (a student token is a target when the teacher token holding its first byte is); and for
    each student position t the teacher position u aligned with it (module docstring), or -1."""
    eos = student_tok.eos_token_id
    if eos is None:
        raise PikvError("cross-tokenizer KD: the student's tokenizer has no EOS token to mark the teacher's "
                        "document boundaries")
    pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else eos
    ids, mask, starts = [], [], []  # per student token: id, target?, (segment, byte start) or None
    t_start = {}  # (segment, byte start) -> teacher token index starting there
    seg, u = 0, 0
    n = len(teacher_ids)
    while u < n:
        b = table[int(teacher_ids[u])] if int(teacher_ids[u]) < len(table) else None
        if b is None:  # a special token: a boundary, the student's EOS
            ids.append(eos)
            mask.append(bool(teacher_mask[u]))
            starts.append(("eos", u))
            t_start[("eos", u)] = u
            seg, u = seg + 1, u + 1
            continue
        v = u  # the segment: teacher tokens u..v-1, no special token among them
        while v < n and int(teacher_ids[v]) < len(table) and table[int(teacher_ids[v])] is not None:
            v += 1
        pieces = [table[int(i)] for i in teacher_ids[u:v]]
        t_off = np.cumsum([0] + [len(x) for x in pieces[:-1]])  # each teacher token's first byte in the segment
        raw = b"".join(pieces)
        lo, hi = _strip_partial(raw)
        text = raw[lo:hi].decode("utf-8", errors="replace")
        exact = text.encode("utf-8") == raw[lo:hi]  # else bytes and characters disagree: align nothing here
        enc = student_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        char_bytes = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])  # char offset -> byte offset
        if exact:
            for j, off in enumerate(t_off):
                t_start[(seg, int(off))] = u + j
        prev = -1
        for tid, (c0, _) in zip(enc["input_ids"], enc["offset_mapping"]):
            byte = lo + int(char_bytes[c0])
            holder = u + int(np.searchsorted(t_off, byte, side="right")) - 1  # the teacher token holding it
            ids.append(tid)
            mask.append(bool(teacher_mask[max(holder, u)]))
            # two student tokens of one character (byte-level BPE) share its offset: only the first starts there
            starts.append((seg, byte) if byte > prev else None)
            prev = max(prev, byte)
        u = v
    ids, mask, starts = ids[:length], mask[:length], starts[:length]
    pos = np.full(length, -1, dtype=np.int64)
    for t in range(len(ids) - 1):  # position t predicts token t+1; the teacher's position u predicts u+1
        w = t_start.get(starts[t + 1]) if starts[t + 1] is not None else None
        if w is not None and w >= 1:
            pos[t] = w - 1
    out_ids = np.full(length, pad, dtype=np.int64)
    out_mask = np.zeros(length, dtype=bool)
    out_ids[:len(ids)], out_mask[:len(mask)] = ids, mask
    return out_ids, out_mask, pos


def uld_rows(s_logits: torch.Tensor, t_logprobs: torch.Tensor, t_tnorm: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N] ULD at T (module docstring): s_logits [N, V_s] the student's logits at the aligned positions,
    t_logprobs [N, k] the teacher's stored top-k T=1 log-probs, t_tnorm [N] its normalizer at T."""
    T = temperature
    p = torch.exp(t_logprobs.float() / T - t_tnorm.float()[:, None])
    p = torch.sort(p, dim=-1, descending=True).values  # stored most probable first; sorting costs nothing then
    k = min(p.shape[-1], s_logits.shape[-1])
    q = torch.softmax(s_logits.float() / T, dim=-1).topk(k, dim=-1).values
    p = p[:, :k]
    tail = ((1 - p.sum(-1)).clamp_min(0) - (1 - q.sum(-1)).clamp_min(0)).abs()
    return (p - q).abs().sum(-1) + tail


def uld_loss(s_logits: torch.Tensor, t_logprobs: torch.Tensor, t_tnorm: torch.Tensor,
             temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """ULD sum over the N aligned positions and N."""
    return uld_rows(s_logits, t_logprobs, t_tnorm, temperature).sum(), s_logits.shape[0]


class Retokenizer:
    """retokenize() for the sequences of one cache: the teacher's token bytes (from the cache's tokenizer
    folder) and the student's tokenizer, loaded once, in the process that reads (a loader worker)."""

    def __init__(self, teacher_tokenizer: str, student_tokenizer: str, length: int):
        self.paths, self.length, self._loaded = (teacher_tokenizer, student_tokenizer), length, None

    def __call__(self, teacher_ids: np.ndarray, teacher_mask: np.ndarray):
        if self._loaded is None:
            from transformers import AutoTokenizer

            t_tok, s_tok = (AutoTokenizer.from_pretrained(p, trust_remote_code=False) for p in self.paths)
            self._loaded = (token_bytes(t_tok), s_tok)
        table, s_tok = self._loaded
        return retokenize(teacher_ids, teacher_mask, table, s_tok, self.length)
