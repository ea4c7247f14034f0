"""Torch datasets of the procedural shapes world for training the default model from scratch.

Every example is a pure function of (seed, index), so a run resumed from a checkpoint sees exactly
the batches it would have seen, and no two processes of a distributed run share an example.
Images go through :func:`pipelines.preprocess.image_to_tensor`, the pipeline's own conversion.
"""
from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from pipelines.preprocess import image_to_tensor

from .scenes import ShapeSpec, training_caption, training_example


def example_seed(seed: int, index: int) -> int:
    """A distinct scene seed per (run seed, example index)."""
    return seed * 1_000_003 + index


def render_tensor(spec: ShapeSpec) -> torch.Tensor:
    """A scene as the autoencoder's input: float (3, 64, 64) in [-1, 1]."""
    image = spec.render()
    return image_to_tensor(image, image.height, image.width)[0]


class ShapeImages(Dataset):
    """``length`` rendered training scenes with a caption each: {"image", "caption"}."""

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed = length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        spec, caption = training_example(example_seed(self.seed, index))
        return {"image": render_tensor(spec), "caption": caption}


def render_batch(seed: int, start: int, count: int) -> tuple[torch.Tensor, list[ShapeSpec]]:
    """Images (count, 3, 64, 64) and specs of the training examples start … start+count-1."""
    specs = [training_example(example_seed(seed, i))[0] for i in range(start, start + count)]
    return torch.stack([render_tensor(s) for s in specs]), specs


class LatentCaptions(Dataset):
    """Precomputed autoencoder posteriors of ``specs`` with a fresh caption per draw.

    Index ``i`` reads latent ``i % len(specs)`` — so a run can be longer than the latent set — and
    phrases its caption with an RNG seeded by ``i`` (each pass over the latents words them anew).
    Items: {"mean", "std", "caption"}; latents are unscaled (multiply by the scale factor).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, specs: list[ShapeSpec], length: int,
                 seed: int = 0):
        if not (len(mean) == len(std) == len(specs)):
            raise ValueError(f"{len(mean)} latent means, {len(std)} stds and {len(specs)} specs")
        self.mean, self.std, self.specs = mean, std, specs
        self.length, self.seed = length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        j = index % len(self.specs)
        caption = training_caption(self.specs[j], random.Random(example_seed(self.seed + 1, index)))
        return {"mean": self.mean[j].float(), "std": self.std[j].float(), "caption": caption}
