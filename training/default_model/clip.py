"""Stage 2: the text encoder, trained CLIP-style (Radford et al. 2021) against a small image tower.

The text tower is our ``FrozenCLIPEmbedder`` (CLIP's text transformer at small width, from
``ldm.modules.clip_text``: it initialises and computes exactly as transformers' CLIPTextModel, which
trained the shipped model; the real CLIP BPE tokenizer); as in CLIP its pooled output is the final
hidden state at the end-of-text token, followed by a linear projection. Loss: symmetric
cross-entropy over the batch's image–text similarity matrix with a learned temperature. Captions
that occur twice in a batch count as matches of each other's images. The image tower, projection
and temperature are kept for a CLIP score.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import TextEncoderConfig
from ldm.modules.text import FrozenCLIPEmbedder
from ldm.modules.tokenizer import EOT, tokenize
from training.shapes import COLOURS, POSITIONS, SHAPES, SIZES, Caption, ShapeSpec, training_caption

from ..shapes.datasets import ShapeImages, render_batch
from .common import RecipeError, Settings, fit, load_weights, model_config, require, save_weights, \
    stage_engine, write_json

STAGE = "clip"
DEFAULTS = dict(steps=2000, batch_size=128, lr=5e-4, warmup=200, save_every=500, weight_decay=0.01)
EVAL_SEED_OFFSET = 6007
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the temperature at 100


class ImageTower(nn.Module):
    """A small convolutional image encoder: 64² → 4² by strided convolutions, then an MLP.

    The flattened 4×4 map (rather than global pooling) keeps where the shape is.
    """

    def __init__(self, dim: int, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * 16, 256), nn.SiLU(),
                                  nn.Linear(256, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class ShapesCLIP(nn.Module):
    """Text tower (kept for conditioning), projection, image tower and temperature."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.text = FrozenCLIPEmbedder(cfg)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)
        self.visual = ImageTower(cfg.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        # the tower is causal: positions after the last end-of-text token cannot change the pooled
        # output, so the batch is cut there (captions are far shorter than 77 tokens)
        eot = (tokens == EOT).int().argmax(dim=1)
        hidden = self.text(tokens[:, : int(eot.max()) + 1])
        pooled = hidden[torch.arange(len(tokens), device=tokens.device), eot]
        return F.normalize(self.text_projection(pooled), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Image-by-text logits."""
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        return scale * self.encode_image(images) @ self.encode_text(tokens).T

    def image_tower_state(self) -> dict[str, torch.Tensor]:
        """Everything but the text encoder: the file kept next to the model for CLIP scores."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text.")}


def contrastive_loss(logits: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric cross-entropy; every image whose caption equals a text's counts as its match."""
    same = torch.tensor([[a == b for b in captions] for a in captions], device=logits.device)
    target = same.float() / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@dataclass
class CLIPOptions:
    eval_images: int = 512
    # blocks the text tower is trained with; the model config's ``layers`` are how many of them
    # condition the UNet (the first ones), so the two may differ
    text_layers: int = 3


def _alternatives(spec: ShapeSpec, attribute: str) -> list[Caption]:
    values = {"colour": COLOURS, "shape": SHAPES, "background": COLOURS, "size": tuple(SIZES),
              "position": tuple(POSITIONS)}[attribute]
    full = spec.caption
    out = []
    for value in values:
        fields = dict(colour=full.colour, shape=full.shape, background=full.background, size=full.size,
                      position=full.position)
        fields[attribute] = value
        if fields["colour"] != fields["background"]:
            out.append(Caption(**fields))
    return out


@torch.no_grad()
def attribute_accuracy(model: ShapesCLIP, count: int, seed: int) -> dict[str, float]:
    """Zero-shot attribute recognition: for each fresh render and attribute, whether the full caption
    with the true value scores highest among the captions that change only that attribute."""
    model.eval()
    device = model.logit_scale.device
    cfg = model.text.config
    images, specs = render_batch(seed, 0, count)
    image_emb = torch.cat([model.encode_image(b.to(device)) for b in images.split(256)])
    result = {}
    for attribute in ("colour", "shape", "background", "size", "position"):
        hits = 0
        for i, spec in enumerate(specs):
            options = _alternatives(spec, attribute)
            text_emb = model.encode_text(tokenize(cfg, [c.text for c in options]).to(device))
            best = options[int((text_emb @ image_emb[i]).argmax())]
            hits += getattr(best, attribute) == getattr(spec, attribute)
        result[attribute] = hits / count
    return result


@torch.no_grad()
def retrieval_accuracy(model: ShapesCLIP, count: int, seed: int) -> float:
    """Fraction of fresh renders whose own training caption is the best of the batch's captions."""
    model.eval()
    device = model.logit_scale.device
    images, specs = render_batch(seed, 0, count)
    rng = random.Random(seed)
    captions = [training_caption(s, rng) for s in specs]
    logits = model(images.to(device), tokenize(model.text.config, captions).to(device))
    best = logits.argmax(dim=1).tolist()
    return sum(captions[j] == captions[i] for i, j in enumerate(best)) / count


def run(settings: Settings, opts: CLIPOptions | None = None) -> dict:
    opts = opts or CLIPOptions()
    settings.check()
    conditioning = model_config(settings).text
    if opts.text_layers < conditioning.layers:
        raise RecipeError(f"--text-layers {opts.text_layers}: the model config conditions on "
                          f"{conditioning.layers} blocks, so the tower needs at least that many")
    cfg = dataclasses.replace(conditioning, layers=opts.text_layers)
    engine = stage_engine(settings, STAGE)
    accelerator = engine.accelerator
    engine.seed()
    model = ShapesCLIP(cfg)
    tokenize(cfg, [""])  # build the tokenizer once, before timing starts
    dataset = ShapeImages(settings.steps * settings.batch_size * accelerator.num_processes,
                          settings.seed + 1)

    def step(m, batch, gen):
        tokens = tokenize(cfg, batch["caption"]).to(batch["image"].device)
        return contrastive_loss(m(batch["image"], tokens), batch["caption"])

    fit(engine, settings, model, dataset, step)
    stats = {}
    if accelerator.is_main_process:
        seed = settings.seed + EVAL_SEED_OFFSET
        stats = {"steps": settings.steps,
                 "retrieval_accuracy": retrieval_accuracy(model, min(opts.eval_images, 256), seed),
                 "attribute_accuracy": attribute_accuracy(model, opts.eval_images, seed),
                 "temperature": 1 / model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().item()}
        out = settings.out / STAGE
        save_weights(model.text.state_dict(), out / "text_encoder.safetensors")
        save_weights(model.image_tower_state(), out / "clip-image.safetensors")
        write_json(out / "stats.json", stats)
        accelerator.print(f"{STAGE}: retrieval accuracy {stats['retrieval_accuracy']:.3f}; attribute "
                          "accuracy " + ", ".join(f"{k} {v:.3f}"
                                                  for k, v in stats["attribute_accuracy"].items()))
    accelerator.wait_for_everyone()
    return stats


def load_text_encoder(settings: Settings) -> FrozenCLIPEmbedder:
    """The stage's trained text tower, frozen (for the UNet and assemble stages)."""
    cfg = model_config(settings).text
    encoder = FrozenCLIPEmbedder(cfg)
    path = require(settings.out / STAGE / "text_encoder.safetensors", STAGE)
    encoder.load_state_dict(first_blocks(load_weights(path), cfg.layers))
    return encoder.eval().requires_grad_(False)


_BLOCK_RE = re.compile(r"\.encoder\.layers\.(\d+)\.")


def _block(key: str) -> int | None:
    """Index of the transformer block a text-tower weight belongs to (None: embeddings, final norm)."""
    match = _BLOCK_RE.search(key)
    return int(match.group(1)) if match else None


def first_blocks(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A trained tower's weights without its blocks from ``layers`` on: the shallower encoder that
    conditions the model (what A1111 calls CLIP skip), with the tower's final layer norm."""
    return {k: v for k, v in state.items() if (b := _block(k)) is None or b < layers}


def tail_blocks(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The trained tower's blocks from ``layers`` on, under ShapesCLIP's ``text.`` prefix: what the
    image-tower file must add when the shipped text encoder keeps only the first ``layers``."""
    return {f"text.{k}": v for k, v in state.items() if (b := _block(k)) is not None and b >= layers}


def load_clip(text_encoder: nn.Module, image_tower_path) -> ShapesCLIP:
    """A scoring CLIP from a text encoder (e.g. a model's ``cond_stage_model``) and the image-tower
    file written by this stage (``weights/tiny-shapes-clip-image.safetensors`` once assembled). When
    the text encoder is the first blocks of the trained tower, the file carries the later ones."""
    state = {k: v.float() for k, v in load_weights(image_tower_path).items()}
    tail = {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    if any(_block(k) is None for k in tail):
        raise ValueError(f"{image_tower_path}: text weights other than transformer blocks")
    extra = len({_block(k) for k in tail})
    cfg = dataclasses.replace(text_encoder.config, layers=text_encoder.config.layers + extra)
    model = ShapesCLIP(cfg)
    image = {k: v for k, v in state.items() if not k.startswith("text.")}
    missing = set(model.image_tower_state()) ^ set(image)
    if missing:
        raise ValueError(f"{image_tower_path}: not a shapes CLIP image tower (keys {sorted(missing)[:3]})")
    text = {k: v.float() for k, v in text_encoder.state_dict().items()}
    model.text.load_state_dict({**text, **tail})
    model.load_state_dict(image, strict=False)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def clip_score(model: ShapesCLIP, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Cosine similarity × 100 of each image (in [-1, 1]) with its caption (Hessel et al. 2021
    report CLIPScore as 2.5 × max(cos, 0); the raw cosine is kept here)."""
    device = model.logit_scale.device
    tokens = tokenize(model.text.config, captions).to(device)
    return 100 * (model.encode_image(images.to(device)) * model.encode_text(tokens)).sum(-1)

