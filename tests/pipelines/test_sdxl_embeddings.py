"""Textual-inversion embeddings on SDXL (A1111's files: ``clip_l`` and ``clip_g``) against diffusers'
documented recipe on identical tiny weights: ``load_textual_inversion(state_dict["clip_g"],
token=..., text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)``, and the same for
``clip_l`` with ``text_encoder``/``tokenizer``."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.embeddings import load_embedding
from ldm.weights_io import CheckpointError
from pipelines.pipeline import Pipeline
from pipelines.sdxl import sdxl_conditioning
from reference import pipelines as dp
from reference.sdxl import random_sdxl_model, sdxl_pipeline
from reference.tiny import tiny_sdxl_tree
from tests.pipelines.test_pipeline_parity import assert_close, assert_far

pytestmark = pytest.mark.usefixtures("single_thread")

WORD, N = "xqzw", 3  # a word the vocabulary does not hold (diffusers refuses vocabulary words)
WIDTHS = {"clip_l": 32, "clip_g": 32}  # the tiny towers' widths
SEED, STEPS, SIZE = 11, 4, 32


def _sdxl_file(path, n: int = N, seed: int = 5, widths=WIDTHS):
    g = torch.Generator().manual_seed(seed)
    save_file({k: torch.randn(n, w, generator=g) for k, w in widths.items()}, path)
    return path


def _reference(model, kind: str, task: str = "txt2img"):
    """diffusers' pipeline on ``model``'s weights, with tokenizers of its own:
    ``load_textual_inversion`` adds the word to them, and reference.tokenizer shares its instances."""
    import copy

    ref = sdxl_pipeline(model, tiny_sdxl_tree(kind), dp.reference_scheduler("euler"), task)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(ref, name) is not None:
            ref.register_modules(**{name: copy.deepcopy(getattr(ref, name))})
    return ref


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(our model, diffusers' SDXL pipeline holding its weights with the word loaded, the file)."""
    path = _sdxl_file(tmp_path_factory.mktemp("emb") / f"{WORD}.safetensors")
    model = random_sdxl_model("sdxl")
    ref = _reference(model, "sdxl")
    state = load_file(path)  # diffusers' documented recipe for SDXL embeddings
    ref.load_textual_inversion(state["clip_g"], token=WORD, text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    ref.load_textual_inversion(state["clip_l"], token=WORD, text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    return model, ref, path


def _ours(model, prompt: str, negative: str, path):
    emb = {WORD: load_embedding(path, WIDTHS)}
    return sdxl_conditioning(model, [prompt], [negative], 0, 1, SIZE, SIZE, True, torch.float32,
                             embeddings=emb)


def _theirs(ref, prompt: str, negative: str):
    with torch.no_grad():
        return ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=True, negative_prompt=negative)


def test_prompt_and_pooled_embeddings_match_diffusers(base):
    model, ref, path = base
    prompt, negative = f"a {WORD} circle", f"blurry {WORD}"
    context, y = _ours(model, prompt, negative, path)
    embeds, neg_embeds, pooled, neg_pooled = _theirs(ref, prompt, negative)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(context[1:], embeds, **close)
    torch.testing.assert_close(context[:1], neg_embeds, **close)
    width = pooled.shape[-1]  # y begins with the pooled bigG projection
    torch.testing.assert_close(y[1:, :width], pooled, **close)
    torch.testing.assert_close(y[:1, :width], neg_pooled, **close)
    plain, plain_y = sdxl_conditioning(model, [prompt], [negative], 0, 1, SIZE, SIZE, True,
                                       torch.float32)
    changed = (context - plain).abs().amax(dim=(0, 1))
    assert changed[:32].max() > 1e-2 and changed[32:].max() > 1e-2  # both towers took vectors
    assert (y[:, :width] - plain_y[:, :width]).abs().max() > 1e-3  # and the pooled output follows


def test_a_word_in_the_second_chunk_matches_diffusers_on_that_chunk(base):
    """73 filler tokens leave 2 places in the first chunk: the word's 3 vectors open the second,
    which then conditions as diffusers' encoding of the text left for it."""
    model, ref, path = base
    context, _ = _ours(model, "a " * 73 + f"{WORD} end", "", path)
    embeds, *_ = _theirs(ref, f"{WORD} end", "")
    assert context.shape[1] == 154
    torch.testing.assert_close(context[1:, 77:], embeds, atol=1e-5, rtol=1e-5)


def test_weights_scale_the_word_in_both_towers(base):
    model, _, path = base
    plain, _ = _ours(model, f"a {WORD} circle", "", path)
    same, _ = _ours(model, f"a ({WORD}:1.0) circle", "", path)
    weighted, _ = _ours(model, f"a ({WORD}:1.4) circle", "", path)
    assert torch.equal(plain, same)
    changed = (weighted - plain)[1].abs().amax(dim=0)
    assert changed[:32].max() > 1e-3 and changed[32:].max() > 1e-3


def test_txt2img_with_the_word_matches_diffusers(base):
    model, ref, path = base
    pipe = Pipeline(model, device="cpu", model_name="tiny-sdxl")
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE, width=SIZE)
    prompt, negative = f"a {WORD} circle", "blurry"
    plain = pipe.txt2img(prompt, negative_prompt=negative, scheduler="euler", seed=SEED,
                         progress=False, **kw)  # the word as plain text
    assert pipe.load_embedding(path) == WORD
    ours = pipe.txt2img(prompt, negative_prompt=negative, scheduler="euler", seed=SEED,
                        progress=False, **kw)
    theirs = ref(prompt, negative_prompt=negative, generator=torch.Generator("cpu").manual_seed(SEED),
                 **kw).images[0]
    assert_close(ours.images[0], theirs)
    assert_far(plain.images[0], theirs)
    assert ours.parameters[0]["TI hashes"].startswith(f"{WORD}: ")


def test_a_word_that_does_not_appear_changes_nothing(base, tmp_path):
    from ldm.weights_io import file_hash

    model, _, path = base
    kw = dict(num_inference_steps=2, seed=3, height=SIZE, width=SIZE, progress=False,
              output_type="latent")
    pipe = Pipeline(model, device="cpu")
    plain = pipe.txt2img("a red circle", negative_prompt="blurry", **kw)
    pipe.embeddings_dir = path.parent
    pipe.load_embedding(path, name="other")
    same = pipe.txt2img("a red circle", negative_prompt="blurry", **kw)
    assert torch.equal(same.latents, plain.latents)  # bit for bit
    assert "TI hashes" not in same.parameters[0]
    used = pipe.txt2img(f"a red {WORD}", negative_prompt="blurry", **kw)  # from embeddings_dir
    assert used.parameters[0]["TI hashes"] == f"{WORD}: {file_hash(path)[:12]}"


def test_files_for_another_model_are_refused_by_name(tmp_path):
    sd1 = tmp_path / "one.safetensors"
    save_file({"emb_params": torch.zeros(2, 32)}, sd1)
    with pytest.raises(CheckpointError, match=r"'one'.*one set of vectors, 32 wide.*clip_l 32 and "
                                              r"clip_g 32.*SD1/SD2"):
        load_embedding(sd1, WIDTHS)
    xl = _sdxl_file(tmp_path / "xl.safetensors", widths={"clip_l": 768, "clip_g": 1280})
    with pytest.raises(CheckpointError, match=r"'xl'.*SDXL embedding \(clip_l 768 and clip_g 1280 "
                                              r"wide\).*32 wide"):
        load_embedding(xl, 32)
    with pytest.raises(CheckpointError, match=r"clip_l 768 and clip_g 1280.*clip_l 32 and clip_g 32"):
        load_embedding(xl, WIDTHS)
    save_file({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(3, 32)}, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="the same number for both"):
        load_embedding(tmp_path / "odd.safetensors")
    pipe = Pipeline(random_sdxl_model("sdxl"), device="cpu")
    with pytest.raises(CheckpointError, match="'one'"):
        pipe.load_embedding(sd1)


def test_the_refiner_takes_the_clip_g_vectors(tmp_path):
    """The refiner has the bigG tower only: it reads ``clip_g`` (A1111's key for that tower), as
    diffusers' refiner pipeline does given the one ``load_textual_inversion`` call it can take."""
    path = _sdxl_file(tmp_path / f"{WORD}.safetensors")
    model = random_sdxl_model("sdxl-refiner")
    ref = _reference(model, "sdxl-refiner", "img2img")
    ref.load_textual_inversion(load_file(path)["clip_g"], token=WORD, text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    prompt, negative = f"a {WORD} circle", WORD
    emb = {WORD: load_embedding(path, {"clip_g": 32})}
    context, y = sdxl_conditioning(model, [prompt], [negative], 0, 1, SIZE, SIZE, True,
                                   torch.float32, embeddings=emb)
    embeds, neg_embeds, pooled, neg_pooled = _theirs(ref, prompt, negative)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(context, torch.cat([neg_embeds, embeds]), **close)
    width = pooled.shape[-1]
    torch.testing.assert_close(y[:, :width], torch.cat([neg_pooled, pooled]), **close)
    pipe = Pipeline(model, device="cpu")
    assert pipe.text_widths() == {"clip_g": 32} and pipe.load_embedding(path) == WORD
    from reference.tokenizer import clip_tokenizer

    assert WORD not in clip_tokenizer("!", 77).get_vocab()  # the shared tokenizers stay as built


def test_an_sdxl_lora_brings_its_bundled_sdxl_embedding(base, tmp_path):
    """A1111's bundled embeddings (``bundle_emb.WORD.clip_l`` / ``.clip_g``) in an SDXL LoRA file
    are prompt words while it is loaded, condition as the same vectors in a file; a one-tower
    bundle is refused before anything is applied."""
    from ldm.lora import lora_adapters
    from tests.pipelines.test_sdxl_lora import _xl_lora

    model, _, path = base
    tensors = load_file(str(_xl_lora(model, tmp_path / "l.safetensors")))
    tensors.update({f"bundle_emb.{WORD}.{k}": v for k, v in load_file(path).items()})
    save_file(tensors, tmp_path / "bundled.safetensors")
    pipe = Pipeline(model, device="cpu")
    name = pipe.load_lora(tmp_path / "bundled.safetensors", scale=0.0)  # the word alone
    args = ([f"a {WORD} circle"], [""], 0, 1, SIZE, SIZE, False, torch.float32)
    with_lora = sdxl_conditioning(model, *args, embeddings=pipe.embeddings)[0]
    assert torch.equal(with_lora, _ours(model, f"a {WORD} circle", "", path)[0][1:])
    pipe.unload_lora(name)
    assert WORD not in pipe.embeddings
    tensors = {k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}
    tensors[f"bundle_emb.{WORD}.string_to_param.*"] = torch.zeros(2, 32)
    save_file(tensors, tmp_path / "one.safetensors")
    with pytest.raises(CheckpointError, match=r"one.safetensors.*one set of vectors, 32 wide"):
        pipe.load_lora(tmp_path / "one.safetensors")
    assert lora_adapters(pipe.model) == {} and WORD not in pipe.embeddings
