"""A tiny randomly initialised Llama model (and a byte-level tokenizer) for fast model tests.

K values are chosen to exercise group-size handling: hidden 48 (< 64, so G=64/128 clamp to 48)
and intermediate 80 (G=64 gives a short last group of 16).
"""

from __future__ import annotations

import torch

HIDDEN = 48
INTERMEDIATE = 80
VOCAB = 259  # 256 bytes + 3 specials


def tiny_config(tie: bool = True):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )


def tiny_llama(seed: int = 0, tie: bool = True, dtype: torch.dtype = torch.float32):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tie)).to(dtype).eval()
    # Larger-than-default random weights so that quantization changes the outputs visibly.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.1)
    return model


def byte_tokenizer():
    """A byte-level tokenizer: one token per UTF-8 byte (ids 0..255)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i, special in enumerate(("<s>", "</s>", "<pad>")):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def random_ids(n: int, seed: int = 1, rows: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, n), generator=g)
