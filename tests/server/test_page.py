"""The page at ``/`` in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright through ``executable_path``, against ``ldm serve`` on a loopback port with the default
model. What a person does: type a prompt and generate, paint a mask and inpaint, interrupt a run,
drop a PNG to read its parameters back, pick a model and a LoRA."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red circle on a blue background"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def _skip(reason: str):
    # also a warning: `pytest -q` lists warnings, while skip reasons need -rs
    warnings.warn(f"page test skipped: {reason}", stacklevel=2)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("playwright is not installed (pip install -e '.[test]')")
    executable = os.environ.get("LDM_TEST_CHROMIUM") or _chromium()
    if executable is None:
        _skip("no Chromium on this machine (apt-get install -y chromium)")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        chromium = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, browser):
    """``ldm serve`` (default model) in a subprocess on a free loopback port, with a models folder
    holding a second copy of the default model and a LoRA folder with one file; yields its URL."""
    folder = tmp_path_factory.mktemp("serve")
    models, loras = folder / "models", folder / "loras"
    models.mkdir()
    loras.mkdir()
    shutil.copy(ROOT / "weights" / "tiny-shapes.safetensors", models / "shapes-copy.safetensors")
    from safetensors.torch import save_file
    import torch
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(loras / "shapes-style.safetensors"))

    port = _free_port()
    log = open(folder / "server.log", "wb")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--models-dir", str(models), "--lora-dir", str(loras)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"ldm serve exited ({process.returncode}):\n"
                            + (folder / "server.log").read_text()[-3000:])
            try:
                _get(url, "/sdapi/v1/sd-models")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail("ldm serve did not answer within 180 s:\n"
                                + (folder / "server.log").read_text()[-3000:])
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _get(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=60) as answer:
        return json.loads(answer.read())


def _post(url: str, path: str, body: dict):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as answer:
        return json.loads(answer.read())


def _pixels(data: str) -> np.ndarray:
    """Base64 PNG (or a data: URL) → its RGB pixels."""
    raw = base64.b64decode(data.split(",", 1)[-1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    yield page
    context.close()
    assert not errors, errors  # no script error during the test


def _fill(page, **fields):
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def _generate(page, path: str) -> tuple[dict, str]:
    """Click Generate; the request body the page sent and the newest gallery image's src."""
    before = page.locator("#gallery .result").count()
    with page.expect_request(lambda r: r.url.endswith(path) and r.method == "POST") as sent:
        page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('#gallery .result').length > {before}",
                           timeout=120_000)
    page.wait_for_selector("#generate:not([disabled])")
    return sent.value.post_data_json, page.get_attribute("#gallery .result .result-image", "src")


# ------------------------------------------------------------------------------------------ tests

def test_typed_prompt_generates_the_apis_png_for_that_seed(page, server):
    page.fill("#prompt", PROMPT)
    _fill(page, seed=42, steps=8, cfg_scale=2.5)
    page.select_option("#sampler", "Euler a")
    body, src = _generate(page, "/sdapi/v1/txt2img")
    assert body["prompt"] == PROMPT and body["seed"] == 42 and body["steps"] == 8
    assert body["sampler_name"] == "Euler a" and body["cfg_scale"] == 2.5

    # the same request straight to the API: the same pixels
    answer = _post(server, "/sdapi/v1/txt2img", {
        "prompt": PROMPT, "seed": 42, "steps": 8, "cfg_scale": 2.5, "sampler_name": "Euler a"})
    assert np.array_equal(_pixels(src), _pixels(answer["images"][0]))
    info = page.inner_text("#gallery .result .result-info")
    assert info.startswith(PROMPT) and "Seed: 42" in info and "Steps: 8" in info
    assert info == json.loads(answer["info"])["infotexts"][0]
    assert page.get_attribute("#gallery .result", "data-seed") == "42"
    assert page.locator("#progress_bar").get_attribute("data-progress") == "1"


def test_painted_mask_inpaints_only_the_painted_part(page, server, tmp_path):
    # a known picture: left half red, right half blue, 64×64
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[:, :32] = (220, 30, 30)
    picture[:, 32:] = (30, 30, 220)
    (tmp_path / "in.png").write_bytes(_png(picture))

    page.check("#mode_img2img")
    page.set_input_files("#init_image", str(tmp_path / "in.png"))
    page.wait_for_selector("#paint[data-size='64x64']")
    page.fill("#prompt", "a green circle")
    _fill(page, seed=7, steps=8, cfg_scale=2.5, denoising_strength=1, mask_blur=0)
    page.select_option("#inpaint_full_res", "0")  # whole picture

    # paint the top-right quarter: drag across it with a brush as wide as a quarter of the canvas
    box = page.locator("#mask_canvas").bounding_box()
    page.evaluate(f"document.getElementById('brush_size').value = {round(box['width'] / 4)}")
    x0, y0 = box["x"] + box["width"] * 0.625, box["y"] + box["height"] * 0.125
    page.mouse.move(x0, y0)
    page.mouse.down()
    for step in range(1, 9):
        page.mouse.move(x0 + box["width"] * 0.25 * step / 8, y0, steps=2)
    page.mouse.move(x0 + box["width"] * 0.25, y0 + box["height"] * 0.25, steps=4)
    page.mouse.move(x0, y0 + box["height"] * 0.25, steps=4)
    page.mouse.up()

    body, src = _generate(page, "/sdapi/v1/img2img")
    mask = _pixels(body["mask"])[..., 0]
    assert mask.shape == (64, 64)
    assert mask[10:22, 42:54].min() == 255, "painted part not white"  # well inside the stroke
    assert mask[40:, :].max() == 0 and mask[:, :24].max() == 0, "unpainted part not black"
    assert np.array_equal(_pixels(body["init_images"][0]), picture)

    shown = _pixels(src)
    answer = _post(server, "/sdapi/v1/img2img", body)
    assert np.array_equal(shown, _pixels(answer["images"][0]))
    far = mask == 0
    far[:48, 16:] = False  # away from the painted quarter: the picture is kept
    assert np.abs(shown[far].astype(int) - picture[far]).max() <= 3
    assert np.abs(shown[mask == 255].astype(int) - picture[mask == 255]).mean() > 20  # repainted


def test_interrupt_stops_a_long_run(page, server):
    page.fill("#prompt", "a blue square")
    _fill(page, seed=3, steps=150, batch_size=8, width=128, height=128)
    start = time.monotonic()
    page.click("#generate")
    # progress and a preview arrive while it runs
    page.wait_for_function("Number(document.getElementById('progress').dataset.step || 0) >= 2",
                           timeout=120_000)
    page.wait_for_selector("#preview:not([hidden])", timeout=60_000)
    assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")
    assert page.is_enabled("#interrupt") and page.is_disabled("#generate")
    page.click("#interrupt")
    page.wait_for_selector("#generate:not([disabled])", timeout=60_000)
    assert "interrupted" in page.inner_text("#status")
    assert time.monotonic() - start < 60
    state = _get(server, "/sdapi/v1/progress")["state"]
    assert state["sampling_step"] < 150 or state.get("interrupted")
    # the server takes the next request as usual
    _fill(page, steps=4, batch_size=1, width="", height="")
    body, src = _generate(page, "/sdapi/v1/txt2img")
    assert _pixels(src).shape == (64, 64, 3)


def test_dropped_png_fills_the_form(page, server):
    answer = _post(server, "/sdapi/v1/txt2img", {
        "prompt": "a green triangle on the left", "negative_prompt": "blurry", "seed": 1234,
        "steps": 7, "cfg_scale": 3.5, "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    png = answer["images"][0]
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        const zone = document.getElementById("png_drop");
        for (const type of ["dragenter", "dragover", "drop"]) {
            zone.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
        }
    }""", png)
    page.wait_for_function("document.getElementById('prompt').value.length > 0", timeout=30_000)
    assert page.input_value("#prompt") == "a green triangle on the left"
    assert page.input_value("#negative_prompt") == "blurry"
    assert page.input_value("#seed") == "1234"
    assert page.input_value("#steps") == "7"
    assert float(page.input_value("#cfg_scale")) == 3.5
    assert page.input_value("#sampler") == "DPM++ 2M"
    assert page.input_value("#scheduler") == "Karras"
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"
    assert "Seed: 1234" in page.inner_text("#png_info")

    # and generating from the filled form makes the same image again
    body, src = _generate(page, "/sdapi/v1/txt2img")
    assert np.array_equal(_pixels(src), _pixels(png))


def test_model_and_lora_pickers(page, server):
    titles = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    copy = next(t for t in titles if "shapes-copy" in t)
    with page.expect_response(lambda r: r.url.endswith("/sdapi/v1/options")
                              and r.request.method == "POST") as switched:
        page.select_option("#model", copy)
    assert switched.value.ok
    page.wait_for_selector("#model:not([disabled])", timeout=60_000)
    assert _get(server, "/sdapi/v1/options")["sd_model_checkpoint"] == copy

    page.fill("#prompt", "a red circle")
    page.select_option("#lora", "shapes-style")
    assert page.input_value("#prompt") == "a red circle <lora:shapes-style:1>"
    assert page.input_value("#lora") == ""


def test_a_refused_request_shows_the_servers_reason(page, server):
    page.fill("#prompt", PROMPT)
    _fill(page, steps=1000)  # over ldm serve's --max-steps (150)
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert "steps" in page.inner_text("#error").lower()
    assert page.inner_text("#status") == "failed"
    page.wait_for_selector("#generate:not([disabled])")
    assert page.locator("#gallery .result").count() == 0


def test_an_image_dropped_on_the_img2img_panel_becomes_its_image(page, server, tmp_path):
    page.check("#mode_img2img")
    picture = np.zeros((48, 80, 3), np.uint8)
    picture[:, :40] = (250, 200, 0)
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "photo.png", {type: "image/png"}));
        document.getElementById("img2img_panel").dispatchEvent(
            new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
    }""", base64.b64encode(_png(picture)).decode())
    page.wait_for_selector("#paint[data-size='80x48']", timeout=10_000)
    assert page.url.endswith("/")  # still the page, not the dropped file
    assert page.input_value("#prompt") == ""  # not read as parameters
