"""Text conditioning: the CLIP BPE tokenizer and the two text towers of Stable Diffusion.

SD1 uses OpenAI CLIP ViT-L/14's text model (:mod:`.clip_text`, transformers' ``CLIPTextModel`` in
plain torch) and conditions on its last hidden state. SD2 uses OpenCLIP ViT-H/14's text tower
(:mod:`.openclip_text`) and conditions on the penultimate block's output followed by ``ln_final``.
The towers import torch only; the tokenizer's packages are imported on use.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..config import TextEncoderConfig
from .clip_text import CLIPTextTransformer
from .openclip_text import OpenCLIPTextTower

SOT, EOT = 49406, 49407


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file that open-clip-torch ships (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open-clip-torch is not installed; it provides the CLIP BPE vocabulary")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"CLIP BPE vocabulary not found at {path}")
    return path


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


class _TextModelHolder(nn.Module):
    """Gives the CLIP model the ``transformer.text_model.*`` key prefix of SD1 checkpoints."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model


class FrozenCLIPEmbedder(nn.Module):
    """SD1 text encoder: CLIP text transformer, conditioning on the last hidden state."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.transformer = _TextModelHolder(CLIPTextTransformer(cfg, eos_token_id=EOT))

    def forward(self, tokens: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """Token ids → (batch, tokens, width). ``clip_skip`` > 0 takes an earlier block's output
        and applies the final layer norm to it, as A1111 and diffusers do."""
        return self.transformer.text_model.encode(tokens, self.config.skip_layers() + clip_skip)


class FrozenOpenCLIPEmbedder(nn.Module):
    """SD2 text encoder: OpenCLIP text tower, conditioning on the penultimate block + ``ln_final``."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.model = OpenCLIPTextTower(cfg)

    def forward(self, tokens: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        return self.model(tokens, self.config.skip_layers() + clip_skip)


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    if cfg.kind == "clip":
        return FrozenCLIPEmbedder(cfg)
    if cfg.kind == "openclip":
        return FrozenOpenCLIPEmbedder(cfg)
    raise ValueError(f"unknown text encoder kind {cfg.kind!r}")
