"""Cross-tokenizer KD from a cache: the student's own tokens of the teacher's text, the positions where both
predict the same next piece of text, and the Universal Logit Distillation loss at those positions.

    ids, mask, teacher_pos = retokenize(teacher_ids, teacher_mask, token_bytes(teacher_tok), student_tok, L)
    loss_sum, count = uld_loss(student_logits_at_aligned, head_logprobs, tnorm, temperature)      # --cross-loss uld
    s_ids = vocab_map(token_bytes(teacher_tok), token_bytes(student_tok), ...)[head_ids]          # --cross-loss match
    loss_sum, count = matched_kd_loss(student_logprobs_T_at(s_ids), s_ids, head_logprobs, tnorm, temperature)

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

Exact-match KD ("match", the default): ULD's sorted distance carries no token identities, so it moves the
student's confidence profile, not its choices (measured on the demo: README). Two tokenizers trained on
similar text share most of their frequent tokens byte for byte; FuseLLM (Wan et al. 2024, "Knowledge Fusion
of Large Language Models", arXiv:2401.10491) carries a teacher's distribution onto another vocabulary by
mapping each token to the target token of the same or, failing that, the nearest spelling (minimum edit
distance). Here only the exact matches are mapped (vocab_map: the teacher token and the student token have
the same bytes; the teacher's EOS is the student's EOS), and the teacher's mass on its other ids stays in
one bucket instead of moving to a token of another spelling. With S the student ids matched by the head
at a position and P(s) = sum of p_T(v) over the head ids v with s(v) = s (a piece and its byte-fallback
twin spell the same bytes: their probability pools),
    KL_match = sum_{s in S} P(s) log(P(s) / q_T(s)) + P_r log(P_r / Q_r),
    P_r = 1 - sum_{s in S} P(s),    Q_r = 1 - sum_{s in S} q_T(s),
forward KL between the two distributions coarsened to the same |S| + 1 events (the matched tokens and
everything else): >= 0, 0 only when they agree there, and the plain bucket loss when the two vocabularies
are one (and no two ids spell the same bytes).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ..errors import PikvError
from .losses import tail_mass


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
    """The exact bytes of every token id; None for special tokens (document boundaries). An added token that
    is not special is stored as its text, not in the byte-level alphabet."""
    kinds = {d.get("type") for d in _decoder_kinds(tokenizer)}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
    out: list[bytes | None] = []
    if "ByteLevel" in kinds:
        table = _byte_level_decoder()
        for i, p in enumerate(pieces):
            if i in special or p is None:
                out.append(None)
            elif i not in added and all(c in table for c in p):
                out.append(bytes(table[c] for c in p))
            else:  # an added (non-special) token stored as plain text
                out.append(p.encode("utf-8"))
        return out
    if "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
        if "ByteFallback" not in kinds and tokenizer.unk_token_id is not None:
            raise PikvError("cross-tokenizer KD needs the exact bytes of the text, and this SentencePiece-style "
                            f"tokenizer has no byte fallback: a character it lacks becomes {tokenizer.unk_token}")
        for i, p in enumerate(pieces):
            if _is_byte_fallback(p):
                out.append(bytes([int(p[3:5], 16)]))
            elif i in special or p is None:
                out.append(None)
            elif i in added:
                out.append(p.encode("utf-8"))
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


def retokenize(teacher_ids: np.ndarray, teacher_mask: np.ndarray, table: list, student_tok, length: int,
               student_table: list | None = None):
    """One cached sequence in the student's tokens.

    Returns (ids [length] int64, mask [length] bool, teacher_pos [length] int64): the student's tokens of
    the same text (a teacher special token becomes the student's EOS), padded with the student's pad id;
    the loss mask (a student token is a target when the teacher token holding its first byte is); and for
    each student position t the teacher position u aligned with it (module docstring), or -1.
    ``student_table``: token_bytes(student_tok), computed when None. Where each student token starts is
    counted in its own bytes, not in the tokenizer's character offsets: a byte-level token may end inside
    a character, and the next one then starts at a byte no character offset names. A student tokenizer that
    prepends a space to each text (SentencePiece's add_dummy_prefix) is followed; one that changes the text
    otherwise (a normalizer) is refused, since its tokens would be of another text than the teacher's."""
    if student_table is None:
        student_table = token_bytes(student_tok)
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
        # the text's own '</s>' or '<|endoftext|>' is text: only the teacher's special tokens mark boundaries
        s_ids = student_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        s_pieces = [student_table[i] if 0 <= i < len(student_table) else None for i in s_ids]
        s_off = _student_starts(s_pieces, text)
        if exact:
            for j, off in enumerate(t_off):
                t_start[(seg, int(off))] = u + j
        for tid, off in zip(s_ids, s_off):
            byte = lo + max(off, 0)
            holder = u + int(np.searchsorted(t_off, byte, side="right")) - 1  # the teacher token holding it
            ids.append(tid)
            mask.append(bool(teacher_mask[max(holder, u)]))
            starts.append((seg, byte) if off >= 0 else None)  # a prepended space starts at no byte of the text
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


def _student_starts(pieces: list, text: str) -> list[int]:
    """Each student token's first byte in ``text`` from the tokens' own bytes; -1 for a token that begins with
    a space the text does not have (SentencePiece's dummy prefix: before the text, and with prepend_scheme
    "always" after each added token too). Refuses tokens that do not spell the text otherwise."""
    if any(p is None for p in pieces):
        raise PikvError("cross-tokenizer KD: the student's tokenizer turned part of the text into an unknown or "
                        "special token, so its tokens do not spell the teacher's text; give a student tokenizer with "
                        "byte fallback (or byte-level BPE)")
    want, out, at = text.encode("utf-8"), [], 0
    for p in pieces:
        if want.startswith(p, at):
            out.append(at)
            at += len(p)
        elif p.startswith(b" ") and want.startswith(p[1:], at):
            out.append(-1)  # a dummy space, then the text's own bytes
            at += len(p) - 1
        else:
            got = b"".join(pieces)
            raise PikvError("cross-tokenizer KD: the student's tokenizer changes the text it tokenizes (a "
                            f"normalizer?): at byte {at} the text has {want[max(0, at - 10):at + 20]!r} but its "
                            f"tokens spell {p!r} there (all: {got[:60]!r}...), so they are not the teacher's text; "
                            "give a student tokenizer without a normalizer")
    if at != len(want):
        raise PikvError(f"cross-tokenizer KD: the student's tokens spell {at} of the text's {len(want)} bytes; its "
                        "tokenizer drops part of the text")
    return out


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


def byte_fallback_ids(tokenizer) -> set[int]:
    """The ids of SentencePiece's byte-fallback tokens (<0x41>): the tokenizer writes a byte with one only where
    no piece spells it, so another id of the same bytes is the one it emits."""
    return {i for i, p in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
            if _is_byte_fallback(p)}


def _is_byte_fallback(piece: str | None) -> bool:
    """Whether a SentencePiece piece is a byte-fallback token such as <0x41>."""
    return piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def vocab_map(teacher_table: list, student_table: list, teacher_eos: int | None, student_eos: int | None,
              student_fallback: set[int] = frozenset()) -> np.ndarray:
    """[V_t] int64: the student id with the same bytes as each teacher id, or -1 (module docstring). Of several
    student ids of the same bytes the one its tokenizer writes is taken: not a byte-fallback id
    (``student_fallback``), else the lowest. Several teacher ids of the same bytes (a piece and its byte-fallback
    twin) all map to it, and the loss pools their probability. A teacher special token (None) matches nothing,
    except its EOS, which retokenize turns into the student's EOS."""
    first: dict[bytes, int] = {}
    for j, b in enumerate(student_table):
        if b is not None and (b not in first or first[b] in student_fallback and j not in student_fallback):
            first[b] = j
    out = np.array([first.get(b, -1) if b is not None else -1 for b in teacher_table], dtype=np.int64)
    if teacher_eos is not None and student_eos is not None and 0 <= teacher_eos < len(out):
        out[teacher_eos] = student_eos
    return out


def matched_kd_rows(s_at: torch.Tensor, s_ids: torch.Tensor, t_logprobs: torch.Tensor, t_tnorm: torch.Tensor,
                    temperature: float, rel_error: float = 2.0 ** -11) -> torch.Tensor:
    """[N] KL_match at T (module docstring), before the T^2 factor: s_at [N, k] the student's log q_T at s_ids
    [N, k], the student id of each teacher head id (-1: none; any s_at there), t_logprobs [N, k] the teacher's
    stored T=1 head log-probs, t_tnorm [N] its normalizer at T. Teacher ids of one student id pool their
    probability on it. The teacher's rest mass below the head's rounding floor counts as 0, as in the bucket
    loss."""
    T = temperature
    k = s_ids.shape[-1]
    matched = s_ids >= 0
    very_low = torch.finfo(torch.float32).min / 4  # exp() of it is 0; unlike -inf its gradients stay finite
    p_top = torch.where(matched, t_logprobs.float() / T - t_tnorm.float()[:, None], very_low)
    p = p_top.exp()
    floor = rel_error / T * torch.where(matched, p * t_logprobs.float().abs(), torch.zeros_like(p)).sum(-1)
    p_rest = tail_mass(p_top, floor)
    # Group equal student ids: sorted, each run of one id is a group; its first member (the leader) carries
    # the group's pooled probability. Unmatched entries get keys of their own (negative), so never group.
    key = torch.where(matched, s_ids, -1 - torch.arange(k, device=s_ids.device))
    key, order = key.sort(-1)
    p_s, s_s, m_s = p.gather(1, order), s_at.gather(1, order), matched.gather(1, order)
    lead = torch.ones_like(m_s)
    lead[:, 1:] = key[:, 1:] != key[:, :-1]
    group = lead.long().cumsum(-1) - 1
    pooled = torch.zeros_like(p_s).scatter_add(1, group, p_s).gather(1, group)
    lead = lead & m_s
    head = torch.where(lead, torch.xlogy(pooled, pooled) - pooled * s_s, torch.zeros_like(p_s)).sum(-1)
    q_rest = tail_mass(torch.where(lead, s_s, very_low))  # each student id once
    rest = torch.xlogy(p_rest, p_rest) - torch.xlogy(p_rest, q_rest.clamp_min(1e-30))
    return head + rest


def matched_kd_loss(s_at: torch.Tensor, s_ids: torch.Tensor, t_logprobs: torch.Tensor, t_tnorm: torch.Tensor,
                    temperature: float = 1.0, rel_error: float = 2.0 ** -11) -> tuple[torch.Tensor, int]:
    """KL_match sum over the N aligned positions (times T^2, as the bucket loss) and N."""
    T = temperature
    return matched_kd_rows(s_at, s_ids, t_logprobs, t_tnorm, T, rel_error).sum() * (T * T), s_at.shape[0]


def uld_loss(s_logits: torch.Tensor, t_logprobs: torch.Tensor, t_tnorm: torch.Tensor,
             temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """ULD sum over the N aligned positions and N."""
    return uld_rows(s_logits, t_logprobs, t_tnorm, temperature).sum(), s_logits.shape[0]


class Retokenizer:
    """retokenize() and vocab_map() for the sequences of one cache: the teacher's token bytes (from the cache's
    tokenizer folder) and the student's tokenizer, loaded once, in the process that reads (a loader worker)."""

    def __init__(self, teacher_tokenizer: str, student_tokenizer: str, length: int):
        self.paths, self.length, self._loaded = (teacher_tokenizer, student_tokenizer), length, None

    def _load(self):
        if self._loaded is None:
            from transformers import AutoTokenizer

            t_tok, s_tok = (AutoTokenizer.from_pretrained(p, trust_remote_code=False) for p in self.paths)
            table, s_table = token_bytes(t_tok), token_bytes(s_tok)
            self._loaded = (table, s_tok, s_table, torch.from_numpy(vocab_map(
                table, s_table, t_tok.eos_token_id, s_tok.eos_token_id, byte_fallback_ids(s_tok))))
        return self._loaded

    def __call__(self, teacher_ids: np.ndarray, teacher_mask: np.ndarray):
        table, s_tok, s_table, _ = self._load()
        return retokenize(teacher_ids, teacher_mask, table, s_tok, self.length, s_table)

    def student_ids(self, head_ids: torch.Tensor) -> torch.Tensor:
        """The student id of each teacher id (vocab_map), -1 where none; ids beyond the teacher's tokenizer
        (a padded embedding) match nothing."""
        id_map = self._load()[3]
        inside = (head_ids >= 0) & (head_ids < len(id_map))
        return torch.where(inside, id_map[head_ids.clamp(0, len(id_map) - 1)], torch.full_like(head_ids, -1))
