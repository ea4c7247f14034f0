"""The A1111 routes in-process (FastAPI's TestClient): response shapes, seeds across n_iter ×
batch_size, images equal to the Python API's, the infotext, LoRA tags, ControlNet units, the lists,
and the fields refused with 422."""
from __future__ import annotations

import json

import pytest
from server import a1111

from .conftest import PROMPT, b64png, same, square_mask, unb64

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 3


def _txt2img(client, **kw):
    body = dict(prompt=PROMPT, steps=STEPS, seed=7, width=64, height=64, cfg_scale=5,
                sampler_name="DPM++ 2M")
    body.update(kw)
    return client.post("/sdapi/v1/txt2img", json=body)


def test_txt2img_answers_as_a1111_with_the_python_apis_images(client, pipe):
    r = _txt2img(client, n_iter=2, batch_size=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])
    assert info["all_seeds"] == [7, 8, 9, 10] and info["seed"] == 7
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras"
    for key in ("prompt", "all_prompts", "width", "height", "cfg_scale", "steps", "batch_size",
                "sd_model_name", "sd_model_hash", "infotexts"):
        assert key in info
    assert info["sd_model_name"] == "tiny-shapes" and info["batch_size"] == 2
    assert body["parameters"]["prompt"] == PROMPT and body["parameters"]["n_iter"] == 2
    images = [unb64(b) for b in body["images"]]
    text = images[0].info["parameters"]
    assert "Sampler: DPM++ 2M" in text and "Schedule type: Karras" in text and "Seed: 7" in text
    assert info["infotexts"][0] == text
    for k in range(2):  # batch k of the request is one Python call seeded 7 + 2k
        ref = pipe.txt2img(PROMPT, seed=7 + 2 * k, num_inference_steps=STEPS, guidance_scale=5,
                           scheduler="dpmpp_2m_karras", width=64, height=64, num_images=2,
                           progress=False)
        assert same(images[2 * k], ref.images[0]) and same(images[2 * k + 1], ref.images[1])


@pytest.mark.parametrize("sampler, scheduler, ours", [
    ("DPM++ 2M Karras", None, "dpmpp_2m_karras"), ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"),
    ("DPM++ 2M", "Uniform", "dpmpp_2m"), ("Euler a", "automatic", "euler_a"),
    ("euler", None, "euler"), ("DDIM", "", "ddim"), ("PLMS", None, "pndm"),
    ("DPM++ SDE Karras", None, "dpmpp_sde_karras")])
def test_sampler_and_schedule_names_as_a1111_reads_them(sampler, scheduler, ours):
    assert a1111.sampler_choice(sampler, scheduler)[2] == ours


@pytest.mark.parametrize("body, field", [
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_checkpoint_name": "other"}, "hr_checkpoint_name"),
    ({"enable_hr": True, "hr_sampler_name": "Euler", "hr_scheduler": "Karras"}, "hr_scheduler"),
    ({"subseed_strength": 1.5}, "subseed_strength"),
    ({"restore_faces": True}, "restore_faces"), ({"tiling": True}, "tiling"),
    ({"styles": ["x"]}, "styles"), ({"s_churn": 1}, "s_churn"),
    ({"sampler_name": "Euler", "scheduler": "Karras"}, "scheduler"),
    ({"sampler_name": "No Such Sampler"}, "sampler_name"),
    ({"sampler_name": "Euler a", "eta": 0.5}, "eta"), ({"script_name": "x/y plot"}, "script_name"),
    ({"alwayson_scripts": {"ADetailer": {"args": [True, {}]}}}, "ADetailer")])
def test_what_would_change_the_image_and_cannot_be_honoured_is_refused(client, body, field):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, **body})
    assert r.status_code == 422, r.text
    err = r.json()
    assert set(err) == {"error", "detail", "body", "errors"} and field in err["errors"]


def test_variation_seeds_and_seed_resize(client, pipe):
    r = _txt2img(client, n_iter=2, subseed=100, subseed_strength=0.3, seed_resize_from_w=32,
                 seed_resize_from_h=48)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_subseeds"] == [100, 101] and info["subseed_strength"] == 0.3
    for k, image in enumerate(r.json()["images"]):
        ref = pipe.txt2img(PROMPT, seed=7 + k, subseed=100 + k, subseed_strength=0.3,
                           seed_resize_from_w=32, seed_resize_from_h=48, num_inference_steps=STEPS,
                           guidance_scale=5, scheduler="dpmpp_2m_karras", width=64, height=64,
                           progress=False)
        assert same(unb64(image), ref.images[0])
        assert "Variation seed strength: 0.3" in unb64(image).info["parameters"]
    # one side alone is off, as in A1111 (webuiapi sends 0 for both)
    assert same(unb64(_txt2img(client, seed_resize_from_w=32).json()["images"][0]),
                unb64(_txt2img(client).json()["images"][0]))


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix(client, pipe, upscaler):
    from pipelines.hires import HiresFix

    r = _txt2img(client, enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler, denoising_strength=0.5,
                 hr_second_pass_steps=2, hr_sampler_name="Euler", batch_size=2)
    assert r.status_code == 200, r.text
    ref = pipe.txt2img(PROMPT, seed=7, num_inference_steps=STEPS, guidance_scale=5,
                       scheduler="dpmpp_2m_karras", width=64, height=64, num_images=2,
                       progress=False, hires=HiresFix(scale=1.5, upscaler=upscaler,
                                                      denoising_strength=0.5, steps=2,
                                                      sampler="euler"))
    images = [unb64(b) for b in r.json()["images"]]
    assert images[0].size == (96, 96)
    assert same(images[0], ref.images[0]) and same(images[1], ref.images[1])
    assert f"Hires upscaler: {upscaler}" in images[0].info["parameters"]
    too_big = _txt2img(client, enable_hr=True, hr_scale=8, width=2048, height=2048)
    assert too_big.status_code == 422 and "width x height" in too_big.json()["detail"]


def test_what_clients_send_by_default_is_accepted(client):
    # webuiapi's defaults: eta 1 with Euler a, s_noise 1, hr settings with enable_hr false,
    # ADetailer switched off, unknown extras
    r = _txt2img(client, sampler_name="Euler a", scheduler="automatic", eta=1.0, s_noise=1,
                 s_churn=0, s_tmax=0, s_tmin=0, hr_scale=2, enable_hr=False, subseed=-1,
                 seed_resize_from_h=0, do_not_save_samples=False, save_images=True,
                 alwayson_scripts={"ADetailer": {"args": [False]}}, some_new_field=3)
    assert r.status_code == 200, r.text


def test_img2img_and_inpainting_equal_the_python_api(client, pipe):
    from pipelines import inpaint_region

    start = pipe.txt2img("a green square", seed=3, num_inference_steps=STEPS, progress=False,
                         width=64, height=64).images[0]
    common = dict(prompt=PROMPT, steps=STEPS, seed=11, cfg_scale=4, sampler_name="Euler",
                  denoising_strength=0.6, init_images=[b64png(start)])
    kw = dict(seed=11, num_inference_steps=STEPS, guidance_scale=4, scheduler="euler",
              progress=False)
    r = client.post("/sdapi/v1/img2img", json=common)
    assert r.status_code == 200, r.text
    assert same(unb64(r.json()["images"][0]), pipe.img2img(PROMPT, start, strength=0.6, **kw).images[0])
    assert r.json()["parameters"]["init_images"] is None  # unless include_init_images

    mask = square_mask()
    # whole picture, original content under the mask ("original"), blur 2
    r = client.post("/sdapi/v1/img2img", json={**common, "mask": b64png(mask), "mask_blur": 2,
                                               "inpainting_fill": 1, "inpaint_full_res": False})
    ref = pipe.inpaint(PROMPT, start, mask, strength=0.6, mask_blur=2, **kw).images[0]
    assert r.status_code == 200, r.text
    assert same(unb64(r.json()["images"][0]), ref)
    # latent noise / latent nothing under the mask (A1111's masked content 2 and 3)
    for fill, name in ((2, "latent_noise"), (3, "latent_nothing")):
        r = client.post("/sdapi/v1/img2img", json={**common, "mask": b64png(mask), "mask_blur": 2,
                                                   "inpainting_fill": fill, "inpaint_full_res": False})
        ref = pipe.inpaint(PROMPT, start, mask, strength=0.6, mask_blur=2, inpainting_fill=name,
                           **kw).images[0]
        assert r.status_code == 200, r.text
        assert same(unb64(r.json()["images"][0]), ref)
    # "only masked" with padding and fill: what clients send by default
    r = client.post("/sdapi/v1/img2img", json={**common, "mask": b64png(mask), "mask_blur": 2,
                                               "inpaint_full_res_padding": 4, "width": 32,
                                               "height": 32})
    ref = inpaint_region.inpaint_only_masked(pipe, PROMPT, start, mask, width=32, height=32,
                                             padding=4, mask_blur=2, fill=True, strength=0.6, **kw)
    out = unb64(r.json()["images"][0])
    assert r.status_code == 200 and out.size == (64, 64) and same(out, ref.images[0])
    assert "Inpaint area: Only masked" in out.info["parameters"]
    # outside the (blurred) mask the picture is the one sent, bit for bit
    assert same(out.crop((0, 0, 10, 10)), start.crop((0, 0, 10, 10)))


def test_lora_tags_in_the_prompt(client, pipe, assets):
    r = _txt2img(client, prompt=f"<lora:mine:0.7> {PROMPT}")
    assert r.status_code == 200, r.text
    pipe.load_lora(assets / "loras" / "mine.safetensors", 0.7, name="mine")
    try:
        ref = pipe.txt2img(f" {PROMPT}", seed=7, num_inference_steps=STEPS, guidance_scale=5,
                           scheduler="dpmpp_2m_karras", width=64, height=64, progress=False)
    finally:
        pipe.unload_lora()
    image = unb64(r.json()["images"][0])
    assert same(image, ref.images[0])
    assert "<lora:mine:0.7>" in image.info["parameters"] and "Lora hashes" in image.info["parameters"]
    plain = unb64(_txt2img(client).json()["images"][0])
    assert not same(plain, image)  # the LoRA is removed after its request
    assert _txt2img(client, prompt="<lora:../mine:1> x").status_code == 422
    assert _txt2img(client, prompt="<lora:nothere:1> x").status_code == 422
    assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ["mine"]


def test_textual_inversion_words_in_the_prompt(client, pipe, assets):
    r = _txt2img(client, prompt=f"a shiny {PROMPT}")
    assert r.status_code == 200, r.text
    pipe.embeddings_dir = assets / "embeddings"
    try:
        ref = pipe.txt2img(f"a shiny {PROMPT}", seed=7, num_inference_steps=STEPS, guidance_scale=5,
                           scheduler="dpmpp_2m_karras", width=64, height=64, progress=False)
    finally:
        pipe.embeddings_dir, pipe.embeddings = None, {}
    assert same(unb64(r.json()["images"][0]), ref.images[0])
    assert not same(unb64(r.json()["images"][0]),
                    unb64(_txt2img(client, prompt=f"a plain {PROMPT}").json()["images"][0]))


def test_controlnet_units(client, pipe, assets):
    from pipelines.control import ControlUnit

    hint = square_mask().convert("RGB")
    unit = {"image": b64png(hint), "module": "none", "model": "edges [abcd1234]", "weight": 0.8,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": 0,
            "resize_mode": "Crop and Resize", "threshold_a": -1, "threshold_b": -1,
            "pixel_perfect": False, "enabled": True}
    r = _txt2img(client, alwayson_scripts={"ControlNet": {"args": [unit, {"enabled": False}]}})
    assert r.status_code == 200, r.text
    ref = pipe.txt2img(PROMPT, seed=7, num_inference_steps=STEPS, guidance_scale=5,
                       scheduler="dpmpp_2m_karras", width=64, height=64, progress=False,
                       control=ControlUnit(assets / "controlnets" / "edges.safetensors", hint, 0.8))
    assert same(unb64(r.json()["images"][0]), ref.images[0])
    bad = _txt2img(client, alwayson_scripts={"ControlNet": {"args": [{**unit, "model": "/etc/x"}]}})
    assert bad.status_code == 422 and "path" in bad.json()["detail"]


def test_lists(client):
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert {"DPM++ 2M", "Euler a", "DDIM"} <= set(names)
    labels = [s["label"] for s in client.get("/sdapi/v1/schedulers").json()]
    assert {"Automatic", "Uniform", "Karras"} <= set(labels)
    models = client.get("/sdapi/v1/sd-models").json()
    assert {m["model_name"] for m in models} == {"tiny-shapes", "other"}
    assert all(m["title"] == f"{m['filename']} [{m['hash']}]" for m in models)
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()] == ["Lanczos", "Nearest"]
    assert "Latent (bicubic antialiased)" in [
        m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    embeddings = client.get("/sdapi/v1/embeddings").json()
    assert embeddings["loaded"]["shiny"]["vectors"] == 2 and list(embeddings["skipped"]) == ["wide"]
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"].startswith("tiny-shapes.safetensors [")
    assert options["CLIP_stop_at_last_layers"] == 1


def test_png_info_reads_the_parameters_back(client):
    image = _txt2img(client).json()["images"][0]
    r = client.post("/sdapi/v1/png-info", json={"image": image})
    assert r.status_code == 200
    body = r.json()
    assert body["info"].startswith(PROMPT)
    assert body["parameters"]["Seed"] == 7 and body["parameters"]["Size-1"] == 64
    assert body["parameters"]["Schedule type"] == "Karras"


def test_options_clip_skip_is_checked_against_the_model(client):
    # the shipped model's text encoder has one block: only "stop at the last layer" is possible
    r = _txt2img(client, override_settings={"CLIP_stop_at_last_layers": 2})
    assert r.status_code == 422 and "clip_skip" in r.json()["detail"]
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0}).status_code == 422


def test_options_that_would_change_images_are_checked(client):
    for body in ({"sd_vae": "other.vae.pt"}, {"eta_noise_seed_delta": 31337}):
        r = client.post("/sdapi/v1/options", json=body)
        assert r.status_code == 422 and list(body)[0] in r.json()["detail"]
        r = _txt2img(client, override_settings=body)
        assert r.status_code == 422 and f"override_settings.{list(body)[0]}" in r.json()["detail"]
    assert client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"}).status_code == 200


def test_eta_of_ddim_comes_from_the_options_when_unset(client, pipe):
    assert client.post("/sdapi/v1/options", json={"eta_ddim": 0.5}).status_code == 200
    try:
        r = _txt2img(client, sampler_name="DDIM")
    finally:
        client.post("/sdapi/v1/options", json={"eta_ddim": 0.0})
    ref = pipe.txt2img(PROMPT, seed=7, num_inference_steps=STEPS, guidance_scale=5,
                       scheduler="ddim", eta=0.5, width=64, height=64, progress=False)
    assert same(unb64(r.json()["images"][0]), ref.images[0])


def test_the_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "<html" in r.text.lower()
