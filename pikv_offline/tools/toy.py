"""Tiny tokenizers and models built locally (no hub): for the demo, the tests and the benchmarks."""

from __future__ import annotations

import math
import time
from typing import Iterable

import numpy as np
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, chat_template: bool = True):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token=None, unk_token=None)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(kind: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
               context: int = 256, seed: int = 0, **extra):
    """A freshly initialised causal LM of a given family ('gpt2' or 'llama') from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "gpt2":
        cfg = AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                                   n_positions=context, bos_token_id=0, eos_token_id=0, **extra)
    elif kind == "llama":
        cfg = AutoConfig.for_model("llama", vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                                   intermediate_size=hidden * 3, max_position_embeddings=context,
                                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **extra)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def train_lm(model, train: np.ndarray, steps: int, *, batch: int = 16, seq: int = 128, lr: float = 2e-3,
             seed: int = 0, log_every: int = 100) -> float:
    """Plain next-token training on random windows of a token stream (AdamW, warmup + cosine); returns seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    rng = np.random.default_rng(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        starts = rng.integers(0, len(train) - seq - 1, size=batch)
        x = torch.from_numpy(np.stack([train[s:s + seq] for s in starts]))
        y = torch.from_numpy(np.stack([train[s + 1:s + seq + 1] for s in starts]))
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  step {step:4d}  train loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return time.perf_counter() - t0
