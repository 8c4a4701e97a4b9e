"""Tiny tokenizers and models built locally (no hub): for the demo, the tests and the benchmarks."""

from __future__ import annotations

from typing import Iterable

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
    import torch
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
