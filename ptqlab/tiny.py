"""Small randomly initialised models of each architecture, made offline.

For tests and for trying the pipeline without a GPU or a download.  Their
perplexity means nothing (the weights are random); quality claims are made on
the trained testbed models instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_ARCHS = ("opt", "bloom", "llama", "mistral", "qwen2", "qwen3", "gpt2")


def make_tokenizer(text_file: str | Path | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer: trained on ``text_file`` if given, else the 256 bytes alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size if text_file else 256 + len(special),
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(text_file)] if text_file else [], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token=None)


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                max_positions: int = 512):
    """A small config of ``arch``; the Llama-shaped ones (llama, mistral, qwen2, qwen3) use grouped-query
    attention with half as many key/value heads as query heads, as their released models do."""
    import transformers

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if arch == "opt":
        return transformers.OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                      ffn_dim=4 * hidden, max_position_embeddings=max_positions,
                                      word_embed_proj_dim=hidden, **common)
    if arch == "bloom":
        return transformers.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                                       **common)
    gated = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    if arch in gated:
        extra = {}
        if arch == "qwen3":
            extra["head_dim"] = hidden // heads  # Qwen3 sets its head size apart from hidden / heads
        if arch == "mistral":
            extra["sliding_window"] = max_positions
        return getattr(transformers, gated[arch])(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2), intermediate_size=2 * hidden,
            max_position_embeddings=max_positions, tie_word_embeddings=False, **extra, **common)
    raise ValueError(f"unknown architecture '{arch}'; choose from {', '.join(TINY_ARCHS)}")


def make_tiny(arch: str, out: str | Path, text_file: str | Path | None = None, seed: int = 0, **sizes) -> Path:
    """Write a tiny random ``arch`` model and its tokenizer to ``out``; loadable with ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    tokenizer = make_tokenizer(text_file)
    config = tiny_config(arch, len(tokenizer), **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
