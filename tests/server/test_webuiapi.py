"""A real client: ``webuiapi`` from PyPI (written for AUTOMATIC1111, with its own defaults) drives a
loopback uvicorn server — txt2img, img2img with a mask, switching the model through options,
png-info, interrupting a long run — and gets the images the Python API makes for the same seeds."""
from __future__ import annotations

import threading
import time

import pytest

from .conftest import PROMPT, config, live_server, same, square_mask, wait_until

webuiapi = pytest.importorskip("webuiapi")
pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 3


@pytest.fixture(scope="module")
def api(assets):
    from server.app import create_app

    app = create_app(config(assets))
    with live_server(app) as (host, port):
        yield webuiapi.WebUIApi(host=host, port=port, sampler="Euler a", steps=STEPS)


def _ref(pipe, seed, **kw):
    return pipe.txt2img(PROMPT, seed=seed, num_inference_steps=STEPS, guidance_scale=5,
                        scheduler="euler_a", width=64, height=64, progress=False, **kw)


def test_txt2img(api, pipe):
    result = api.txt2img(prompt=PROMPT, seed=5, width=64, height=64, cfg_scale=5, batch_size=2)
    assert len(result.images) == 2 and result.info["all_seeds"] == [5, 6]
    ref = _ref(pipe, 5, num_images=2)
    assert same(result.images[0], ref.images[0]) and same(result.images[1], ref.images[1])
    assert "Sampler: Euler a" in result.images[0].info["parameters"]


def test_img2img_with_a_mask(api, pipe):
    from pipelines import inpaint_region

    start = _ref(pipe, 1).images[0]
    mask = square_mask()
    # webuiapi's defaults: only masked, padding 0, blur 4, fill, strength 0.75, eta 1
    result = api.img2img(images=[start], mask_image=mask, prompt=PROMPT, seed=9, width=64,
                         height=64, cfg_scale=5)
    ref = inpaint_region.inpaint_only_masked(
        pipe, PROMPT, start, mask, width=64, height=64, padding=0, mask_blur=4, fill=True,
        strength=0.75, seed=9, num_inference_steps=STEPS, guidance_scale=5, scheduler="euler_a",
        progress=False)
    assert same(result.image, ref.images[0])
    assert same(result.image.crop((0, 0, 8, 8)), start.crop((0, 0, 8, 8)))


def test_switching_the_model_through_options(api, pipe):
    titles = api.util_get_model_names()
    assert any(t.startswith("other.safetensors [") for t in titles)
    api.util_set_model("other")
    try:
        assert api.util_get_current_model().startswith("other.safetensors [")
        result = api.txt2img(prompt=PROMPT, seed=5, width=64, height=64, cfg_scale=5)
        assert result.info["sd_model_name"] == "other"
        assert "Model: other" in result.image.info["parameters"]
        assert same(result.image, _ref(pipe, 5).images[0])  # the same weights under another name
    finally:
        api.util_set_model("tiny-shapes")
    assert api.util_get_current_model().startswith("tiny-shapes.safetensors [")
    with pytest.raises(RuntimeError):  # webuiapi raises on a non-200 answer
        api.txt2img(prompt=PROMPT, steps=1, width=64, height=64,
                    override_settings={"sd_model_checkpoint": "../../etc/passwd"})


def test_png_info(api):
    image = api.txt2img(prompt=PROMPT, seed=3, width=64, height=64).image
    info = api.png_info(image)
    assert info.info == image.info["parameters"]
    assert info.json["parameters"]["Seed"] == 3 and info.json["parameters"]["Prompt"] == PROMPT


def test_interrupting_a_long_run(api):
    answers = {}

    def long_run():
        start = time.time()
        answers["result"] = api.txt2img(prompt=PROMPT, seed=2, width=64, height=64, steps=150)
        answers["seconds"] = time.time() - start

    thread = threading.Thread(target=long_run)
    thread.start()
    progress = wait_until(lambda: (p := api.get_progress())["state"]["sampling_step"] >= 2 and p)
    assert progress["state"]["sampling_steps"] == 150 and 0 < progress["progress"] < 0.5
    assert progress["current_image"]  # the preview, base64 PNG
    api.interrupt()
    thread.join(120)
    result = answers["result"]
    assert len(result.images) == 1  # what was made so far, as A1111 answers
    assert wait_until(lambda: api.get_progress()["state"]["job_count"] == 0, timeout=10)
    # the next request is not interrupted
    assert len(api.txt2img(prompt=PROMPT, seed=2, width=64, height=64, steps=2).images) == 1


def test_skip_moves_on_to_the_next_batch(api):
    answers = {}

    def run():
        answers["result"] = api.txt2img(prompt=PROMPT, seed=4, width=64, height=64, steps=150,
                                        n_iter=2)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: api.get_progress()["state"]["sampling_step"] >= 2)
    api.skip()
    progress = wait_until(lambda: (p := api.get_progress())["state"]["job_no"] == 1 and p)
    assert progress["state"]["job_count"] == 2 and progress["progress"] >= 0.5
    api.interrupt()
    thread.join(120)
    assert answers["result"].info["all_seeds"] == [4, 5]  # both batches answered
