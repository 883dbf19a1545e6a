"""Tokenizers llmctl makes itself: plain bytes (vocab 256 + special tokens) and byte-level BPE, both saved in the
Hugging Face format so that `AutoTokenizer.from_pretrained(dir)` loads them as they are."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmctl.errors import ConfigError

BYTE_VOCAB = 256


@lru_cache(maxsize=1)
def byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255, in byte order (GPT-2's mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer(special_tokens: list[str]) -> Tokenizer:
    """A byte-level tokenizer without merges whose id for each byte is the byte's value; special tokens follow
    from 256. Encoding text is then just its UTF-8 bytes, which lets preprocess skip the tokenizer entirely."""
    vocab = {char: byte for byte, char in enumerate(byte_alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(special_tokens)
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, special_tokens: list[str]) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE of `vocab_size` ids (alphabet and special tokens included)."""
    needed = BYTE_VOCAB + len(special_tokens)
    if vocab_size < needed:
        raise ConfigError(
            f"tokenizer.vocab_size: {vocab_size} leaves no room for the 256 bytes and {len(special_tokens)} "
            f"special token(s); use 256 (bytes) or at least {needed}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def to_transformers(tokenizer: Tokenizer, eos_token: str, model_max_length: int | None = None):
    """Wrap a `tokenizers.Tokenizer` so that `save_pretrained` writes tokenizer.json + tokenizer_config.json.

    The end-of-text token doubles as bos, and as pad (GPT-2's convention) so that batched generation and
    evaluation can pad without adding a token the model never saw.
    """
    from transformers import PreTrainedTokenizerFast

    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eos_token, bos_token=eos_token, pad_token=eos_token, **kwargs
    )
