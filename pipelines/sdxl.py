"""SDXL conditioning for a generation: both text towers and the vector ``y`` (Podell et al. 2023).

Each text tower gets A1111's treatment of the prompt (:mod:`pipelines.prompts`: emphasis, 75-token
chunks, BREAK), weighted and mean-restored per tower as A1111 does for SDXL; the chunks' states are
concatenated along the tokens and the pooled vector is the first chunk's (A1111). The size ids are
diffusers' defaults: original and target size (height, width), crop (0, 0), for both halves of
classifier-free guidance; the refiner takes an aesthetic score instead of the target size (6.0 for
the prompt, 2.5 for the negative, diffusers' defaults). ``force_zeros_for_empty_prompt``: an empty
negative prompt on the base model gives zero conditioning, as diffusers does when no negative
prompt is given (its SDXL base models ship with that switch on, the refiner with it off).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ldm.modules.tokenizer import EOT, SOT, tokenizer_for

from .prompts import Chunk, apply_weights, chunk_ids, embedding_overrides, tokenize_prompt

AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def _pair(value, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ValueError(f"sdxl.{name} must be (height, width) / (top, left) in whole pixels, "
                         f"got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning (Podell et al. 2023, §2.2), diffusers' names and defaults: the
    size the training image had (``original_size``), where it was cropped, the size asked for
    (``target_size``), each (height, width) or (top, left) in pixels, None = the output size; the
    ``negative_*`` ones for the unconditional half: sizes None = as the positive, crop (0, 0) as
    diffusers' img2img and inpainting pipelines have it (its txt2img pipeline copies the positive
    crop unless both negative sizes are given); the refiner's aesthetic scores."""
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE

    def __post_init__(self):
        for name in ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                     "negative_crops_coords_top_left", "negative_target_size"):
            object.__setattr__(self, name, _pair(getattr(self, name), name))
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"sdxl.{name} must be a number, got {value!r}")

    def half(self, negative: bool, height: int, width: int) -> dict[str, tuple[float, ...]]:
        """The numbers of one half of guidance by sgm input key."""
        original, crop, target = self.original_size, self.crops_coords_top_left, self.target_size
        if negative:
            original = self.negative_original_size or original
            crop = self.negative_crops_coords_top_left
            target = self.negative_target_size or target
        score = self.negative_aesthetic_score if negative else self.aesthetic_score
        return {"original_size_as_tuple": original or (height, width), "crop_coords_top_left": crop,
                "target_size_as_tuple": target or (height, width), "aesthetic_score": (score,)}


def size_values(cfg, rows: int, numbers: dict[str, tuple[float, ...]]) -> dict[str, torch.Tensor]:
    """The numbers each sgm vector embedder of ``cfg`` (a ConditionerConfig) reads, ``rows`` times."""
    keys = [e.input_key for e in cfg.embedders if e.text is None]
    return {k: torch.tensor([list(map(float, numbers[k]))] * rows) for k in keys}


def force_zeros_for_empty_prompt(cfg) -> bool:
    """diffusers' switch: on for models with the CLIP-L tower (base, inpainting), off for the
    refiner."""
    return any(t.kind == "clip" for t in cfg.texts)


def _encode(model, texts: list[str], clip_skip: int, embeddings=None
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """text → (context (1, 77·k, width), pooled (1, dim)) for each distinct text, all padded to the
    same k chunks with empty-prompt chunks (as pipelines.prompts.encode_prompts). ``embeddings``
    (word → SDXL TextualInversion): each tower's rows at the word take that tower's vectors
    (clip_l, clip_g), as A1111 and diffusers' two ``load_textual_inversion`` calls do."""
    from ldm.embeddings import TOWER_KEYS, overridden

    cond = model.conditioner
    towers = cond.config.texts
    tokenizer = tokenizer_for(towers[0])
    length = towers[0].max_length
    # one tokenisation per tower: the same tokens and chunks (an SDXL file has as many clip_l as
    # clip_g vectors), each with its tower's vectors under the word
    views = [{w: e.tower(TOWER_KEYS[t.kind]) for w, e in (embeddings or {}).items()} for t in towers]
    chunked = {t: [tokenize_prompt(tokenizer, t, length - 2, embeddings=v) for v in views]
               for t in dict.fromkeys(texts)}
    k = max(len(c[0]) for c in chunked.values())
    out = {}
    with torch.no_grad():
        for text, per_tower in chunked.items():
            ids, weights, overrides = [], None, []
            for tower, chunks in zip(towers, per_tower):
                chunks = chunks + [Chunk([], [])] * (k - len(chunks))
                rows = [chunk_ids(c, tower.pad_token_id, tower.max_length, SOT, EOT) for c in chunks]
                ids.append(torch.tensor([r[0] for r in rows]))
                weights = torch.tensor([r[1] for r in rows])
                overrides.append(embedding_overrides(chunks, ids[-1].shape))
            with contextlib.ExitStack() as stack:
                for module, override in zip(cond.text_embedders, overrides):
                    if override is not None:
                        stack.enter_context(overridden(module, *override))
                hidden, pooled = cond(ids, clip_skip)  # the pooled vector: the first chunk's (A1111)
            states = [apply_weights(h, weights) for h in hidden]
            context = torch.cat([s.to(states[-1].dtype) for s in states], dim=-1)
            out[text] = (context.reshape(1, -1, context.shape[-1]), pooled[:1])
    return out


def check_mode(cfg, mode: str) -> None:
    """The refiner (no CLIP-L tower) was trained on the last fifth of the noise levels only: it
    refines images, it does not make them from noise."""
    if mode == "txt2img" and not force_zeros_for_empty_prompt(cfg):
        raise ValueError("this is an SDXL refiner: it refines images (img2img, inpaint) and cannot "
                         "make one from noise; use an SDXL base model for txt2img")


def sdxl_conditioning(model, prompts: list[str], negatives: list[str], clip_skip: int,
                      num_images: int, height: int, width: int, guidance: bool,
                      dtype: torch.dtype, sizes: SizeConditioning | None = None, embeddings=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, y) of every image: rows [uncond, cond] with guidance, else cond; ``embeddings``:
    textual-inversion words (SDXL files) usable in prompts and negative prompts."""
    cfg = model.conditioner.config
    sizes = sizes or SizeConditioning()
    prompts, negatives = list(prompts), list(negatives)  # the request holds tuples
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts")
    encoded = _encode(model, prompts + (negatives if guidance else []), clip_skip, embeddings)

    def half(texts: list[str], negative: bool, zeros: bool):
        context = torch.cat([encoded[t][0] for t in texts]).repeat_interleave(num_images, 0)
        pooled = torch.cat([encoded[t][1] for t in texts]).repeat_interleave(num_images, 0)
        if zeros:
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        values = size_values(cfg, context.shape[0], sizes.half(negative, height, width))
        return context.to(dtype), model.conditioner.vector(pooled, values).to(dtype)

    cond = half(prompts, False, False)
    if not guidance:
        return cond
    zeros = force_zeros_for_empty_prompt(cfg) and all(n == "" for n in negatives)
    uncond = half(negatives, True, zeros)
    return torch.cat([uncond[0], cond[0]]), torch.cat([uncond[1], cond[1]])
