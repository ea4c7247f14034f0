"""The tokenizer the images were first made with: ``transformers.CLIPTokenizer`` built offline from
the BPE file open-clip-torch ships. The product tokenizes with :mod:`ldm.modules.tokenizer`, which
must give the same ids; this one stays for the tests that prove it and for building diffusers
pipelines (a tokenizer object diffusers can call and save).
"""
from __future__ import annotations

import functools
import gzip
import html

import torch

from ldm.config import TextEncoderConfig
from ldm.modules.tokenizer import EOT, clip_bpe_path

__all__ = ["clip_tokenizer", "tokenizer_for", "clean_text", "tokenize"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


@functools.lru_cache(maxsize=None)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    # CLIP's vocabulary: 256 byte symbols, the same with </w>, one entry per merge (the first
    # 49152 - 256 - 2 merge lines after the header), then the two special tokens: 49408 ids.
    lines = gzip.open(clip_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1: 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


@functools.lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` built offline from the shipped BPE file.

    SD1 pads with ``<|endoftext|>`` (49407), SD2 with ``!`` (id 0), as each was trained.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], pad_token=pad_token,
                         model_max_length=max_length)


def tokenizer_for(cfg: TextEncoderConfig):
    pad = "<|endoftext|>" if cfg.pad_token_id == EOT else "!"
    return clip_tokenizer(pad, cfg.max_length)


def clean_text(text: str) -> str:
    """The cleaning CLIP's own tokenizers apply before BPE (ftfy repair, HTML entities twice,
    whitespace runs folded): curly quotes, full-width letters and "&amp;" tokenize as open_clip does."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


def tokenize(cfg: TextEncoderConfig, texts: list[str]) -> torch.Tensor:
    """Ids of shape (len(texts), max_length): start token, up to max_length-2 tokens, end, padding."""
    tok = tokenizer_for(cfg)
    return tok([clean_text(t) for t in texts], padding="max_length", truncation=True, max_length=cfg.max_length,
               return_tensors="pt").input_ids
