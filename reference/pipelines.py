"""diffusers Stable Diffusion pipelines assembled from one of our (random-weight) models, as the
independent reference for pipeline parity tests. Weights go through diffusers' own converters
(reference/models.py); schedulers are diffusers classes configured here, written out separately
from pipelines/schedulers.py, with the values SD ships."""
from __future__ import annotations

from ldm.model import LatentDiffusion
from reference.tokenizer import clip_tokenizer
from reference.models import diffusers_unet, diffusers_vae, transformers_text_model

_SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
           beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")


def reference_scheduler(name: str, prediction: str = "eps"):
    """A diffusers scheduler as a diffusers user configures it for SD."""
    import diffusers

    kind = "epsilon" if prediction == "eps" else "v_prediction"
    table = {
        "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
        "euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
        "heun": ("HeunDiscreteScheduler", {}),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
        "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    }
    cls_name, extra = table[name]
    return getattr(diffusers, cls_name)(**_SD, **extra, prediction_type=kind)


def _text_encoder(model: LatentDiffusion, state_dict: dict):
    """transformers CLIPTextModel for the pipeline. SD2 conditions on the penultimate block (then
    the final layer norm): diffusers models that by dropping the last block, as its SD2 files do."""
    text = transformers_text_model(model, state_dict)
    skip = model.config.text.skip_layers()
    if skip:
        text.encoder.layers = text.encoder.layers[:-skip]
        text.config.num_hidden_layers -= skip
    return text


def components(model: LatentDiffusion, tree: dict) -> dict:
    """diffusers/transformers modules holding ``model``'s weights (``tree``: its CompVis config)."""
    sd = {k: v.float() for k, v in model.state_dict().items()}
    pad = "<|endoftext|>" if model.config.text.kind == "clip" else "!"
    return dict(vae=diffusers_vae(tree, sd), text_encoder=_text_encoder(model, sd),
                tokenizer=clip_tokenizer(pad, model.config.text.max_length),
                unet=diffusers_unet(tree, sd))


def pipeline(kind: str, parts: dict, scheduler):
    """``kind``: "txt2img", "img2img" or "inpaint" → that diffusers SD pipeline on CPU in fp32,
    built from :func:`components` and a scheduler, without a safety checker."""
    import diffusers

    cls = {"txt2img": diffusers.StableDiffusionPipeline,
           "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    pipe = cls(**parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_model(kind: str = "sd1") -> LatentDiffusion:
    """A tiny model whose images depend visibly on seed, prompt and guidance: the UNet is randomised
    at unit scale (its ε output then has a standard deviation near 1 and the text conditioning moves
    it by ~10 %), so an image comparison can tell a CFG or conditioning mistake from rounding."""
    from reference.models import randomize_
    from reference.tiny import tiny_config

    model = randomize_(LatentDiffusion(tiny_config(kind)), seed=1)
    randomize_(model.model.diffusion_model, seed=2, scale=1.0)
    return model.eval()


def sample_image(width: int = 32, height: int = 32, seed: int = 0):
    """A colourful RGB test picture: gradients plus a little noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin((xx + yy) / 3)], -1) * 220
    arr += rng.uniform(0, 35, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def box_mask(width: int = 32, height: int = 32, box=(8, 8, 24, 24)):
    """A black "L" mask with a white (repaint) rectangle."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    return mask
