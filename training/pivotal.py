"""Pivotal tuning for the LoRA trainer: new vectors for the concept word, trained together with the
LoRA (diffusers' advanced DreamBooth-LoRA script, kohya's embedding + LoRA; Ruiz et al.'s prior
preservation is separate, see :mod:`training.class_images`).

The word's vectors enter the text encoder exactly as a textual-inversion embedding does at
inference (:func:`training.embedding.token_inputs`, :func:`ldm.embeddings.overridden`), so what is
learned is an ordinary embedding: it is written beside the LoRA as ``<lora stem>_emb.safetensors``
(A1111's ``emb_params`` layout, which A1111's embeddings folder and diffusers'
``load_textual_inversion(path, token=WORD)`` read) and named in the LoRA file's header, so that
:meth:`pipelines.pipeline.Pipeline.load_lora` loads it with the LoRA.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

EMBEDDING_TOKEN_KEY = "ldm_embedding_token"  # LoRA header: the word the embedding file stands for
EMBEDDING_FILE_KEY = "ldm_embedding_file"  # LoRA header: the embedding file's name, beside the LoRA
STATE_FILE = "embedding.safetensors"  # the vectors inside a training state


def embedding_path(lora: Path) -> Path:
    """Where the embedding of a pivotal-tuned LoRA goes (diffusers' advanced script's ``_emb``)."""
    return lora.with_name(f"{lora.stem}_emb.safetensors")


class Pivot:
    """The concept word, its trainable vectors and the captions' token inputs."""

    def __init__(self, model, token: str, init_word: str | None, vectors: int, note=print):
        from ldm.modules.tokenizer import tokenizer_for
        from training.words import _row_numbers, check_token, init_vectors

        self.token, self.cfg = token, model.config.text
        self.tokenizer = tokenizer_for(model.config.text)
        check_token(self.tokenizer, token, note=note)
        self.words = _row_numbers(token, vectors)
        self.initial = init_vectors(model.cond_stage_model, self.tokenizer, init_word or token, vectors)

    def captions(self, examples: list) -> list:
        """The training examples with the word in every caption (``[name]`` → the word; a caption
        without it gets ``"word, "`` in front), as the textual-inversion trainer does."""
        from training.words import with_word

        return [dataclasses.replace(ex, caption=with_word(self.tokenizer, ex.caption, self.token))
                for ex in examples]

    def inputs(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from training.words import token_inputs

        return token_inputs(self.cfg, self.tokenizer, self.words, captions)


def save_vectors(path: Path, token: str, vectors: torch.Tensor, step: int | None = None) -> None:
    from ldm.embeddings import save_embedding

    save_embedding(path, token, vectors, step=step)


def load_vectors(path: Path, into: torch.nn.Parameter) -> None:
    from ldm.embeddings import load_embedding

    with torch.no_grad():
        into.copy_(load_embedding(path, into.shape[1]).vectors)


def header(lora: Path, token: str) -> dict[str, str]:
    return {EMBEDDING_TOKEN_KEY: token, EMBEDDING_FILE_KEY: embedding_path(lora).name}
