"""Shared pieces of the server tests: a models folder with two checkpoints (the shipped model and a
copy under another name), a LoRA and a ControlNet made for the shipped model, the Python API to
compare with, an in-process client and a loopback uvicorn server."""
from __future__ import annotations

import base64
import contextlib
import io
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")

PROMPT = "a red circle on a blue background"


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def unb64(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(pixels(a), pixels(b))


def square_mask(size=64, box=(20, 20, 44, 44)) -> Image.Image:
    from PIL import ImageDraw

    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """models/ (tiny-shapes.safetensors is the default; other.safetensors a copy), loras/mine,
    controlnets/edges, embeddings/shiny (and wide, made for a wider text encoder)."""
    from ldm import lora as L
    from ldm.controlnet_config import ControlNetConfig
    from ldm.modules.controlnet import ControlNet
    from pipelines.pipeline import DEFAULT_CHECKPOINT, Pipeline
    from reference.models import randomize_
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("serve")
    (root / "models").mkdir()
    shutil.copy(DEFAULT_CHECKPOINT, root / "models" / "other.safetensors")
    (root / "loras").mkdir()
    (root / "controlnets").mkdir()
    model = Pipeline.from_checkpoint().model
    params = L.add_lora(model, "mine", rank=4, alpha=2.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    L.save_lora(model, root / "loras" / "mine.safetensors", "mine")
    from ldm.embeddings import save_embedding

    (root / "embeddings").mkdir()
    save_embedding(root / "embeddings" / "shiny.safetensors", "shiny", torch.randn(2, 128, generator=g))
    save_embedding(root / "embeddings" / "wide.safetensors", "wide", torch.randn(1, 768, generator=g))
    net = randomize_(ControlNet(ControlNetConfig.from_unet(model.config.unet)), seed=3, scale=0.5)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              root / "controlnets" / "edges.safetensors")
    return root


@pytest.fixture(scope="session")
def pipe():
    """The Python API on the shipped model: what the server's images must equal."""
    from pipelines.pipeline import Pipeline

    p = Pipeline.from_checkpoint()
    p.controlnet_dirs = []
    return p


def config(assets, **kw):
    from server.app import ServerConfig

    return ServerConfig(models_dir=str(assets / "models"), lora_dir=str(assets / "loras"),
                        controlnet_dir=str(assets / "controlnets"),
                        embeddings_dir=str(assets / "embeddings"), **kw)


@pytest.fixture(scope="module")
def client(assets):
    from fastapi.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(config(assets))) as c:
        yield c


@contextlib.contextmanager
def live_server(app):
    """``app`` under uvicorn on a free loopback port, in a thread; yields (host, port)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not (server.started and server.servers):
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until(predicate, timeout=60.0, every=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")
