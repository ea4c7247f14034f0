"""Faults and bad input: each gets its status code and a message naming the problem, and the
request after it still works; queued clients that go away lose their place; --max-queue answers
503; SIGTERM lets the running job finish and exits 0."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import requests

from .conftest import PROMPT, config, live_server, wait_until

pytestmark = pytest.mark.usefixtures("single_thread")
QUICK = {"prompt": PROMPT, "steps": 1, "seed": 1, "width": 64, "height": 64}


def _works(client):
    r = client.post("/sdapi/v1/txt2img", json=QUICK)
    assert r.status_code == 200, r.text


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side=50_000) -> str:
    """A tiny file whose header claims side × side pixels: a decompression bomb."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
           + _chunk(b"IDAT", zlib.compress(b"\0" * (side + 1))) + _chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


@pytest.mark.parametrize("name, send, status, message", [
    ("malformed JSON", dict(content=b'{"prompt": "x",', headers={"content-type": "application/json"}),
     422, "malformed JSON"),
    ("bad base64", dict(json={**QUICK, "init_images": ["not base64!!"]}), 422,
     "init_images[0]: not valid base64"),
    ("not an image", dict(json={**QUICK, "init_images": [base64.b64encode(b"hello").decode()]}),
     422, "init_images[0]: not an image"),
    ("decompression bomb", dict(json={**QUICK, "init_images": [bomb_png()]}), 413,
     "init_images[0]: image too large"),  # Pillow's own guard
    ("bomb under Pillow's guard", dict(json={**QUICK, "init_images": [bomb_png(5000)]}), 413,
     "init_images[0]: image is 5000x5000, more than the limit"),
    ("20000x20000", dict(json={**QUICK, "width": 20000, "height": 20000}), 422,
     "width x height: 20000x20000 is more than the limit"),
    ("too many images", dict(json={**QUICK, "batch_size": 16, "n_iter": 16}), 422,
     "batch_size x n_iter: 256 images"),
    ("too many steps", dict(json={**QUICK, "steps": 10_000}), 422, "steps: 10000"),
    ("../ model name", dict(json={**QUICK, "override_settings": {
        "sd_model_checkpoint": "../models/other.safetensors"}}), 422, "is a path"),
    ("image URL", dict(json={**QUICK, "init_images": ["http://169.254.169.254/x.png"]}), 422,
     "image URLs are not fetched"),
    ("width not a multiple of 8", dict(json={**QUICK, "width": 60}), 422, "multiple of 8"),
])
def test_bad_requests_get_their_status_and_message(client, name, send, status, message):
    route = "/sdapi/v1/img2img" if "init_images" in send.get("json", {}) else "/sdapi/v1/txt2img"
    r = client.post(route, **send)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error", "detail", "body", "errors"}
    assert message in err["errors"]
    _works(client)


def test_a_path_as_model_name_is_refused_by_options(client):
    for name in ("../models/other.safetensors", "/etc/passwd", "..\\x", "nothere"):
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert r.status_code == 422 and "sd_model_checkpoint" in r.json()["detail"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-shapes")
    _works(client)


def test_credentials_and_body_limit(assets):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.security import Limits

    app = create_app(config(assets, api_auth="ann:secret,bob:pw2",
                            limits=Limits(max_body_bytes=4096)))
    with TestClient(app) as c:
        for path in ("/sdapi/v1/samplers", "/", "/static/index.html", "/docs"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        r = c.post("/sdapi/v1/txt2img", json=QUICK, auth=("ann", "wrong"))
        assert r.status_code == 401 and r.json()["detail"] == "Incorrect username or password"
        assert c.get("/sdapi/v1/samplers", auth=("eve", "secret")).status_code == 401
        assert c.get("/sdapi/v1/samplers", auth=("bob", "pw2")).status_code == 200
        assert c.get("/", auth=("ann", "secret")).status_code == 200
        r = c.post("/sdapi/v1/txt2img", json={**QUICK, "prompt": "x" * 5000}, auth=("ann", "secret"))
        assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]
        r = c.post("/sdapi/v1/txt2img", json=QUICK, auth=("ann", "secret"))
        assert r.status_code == 200


def _raw_post(host, port, body: dict) -> socket.socket:
    """Send a request and leave the answer unread: a client that may go away."""
    data = json.dumps(body).encode()
    s = socket.create_connection((host, port))
    s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def _long_run(url, answers, key="long"):
    def go():
        answers[key] = requests.post(f"{url}/sdapi/v1/txt2img", json={**QUICK, "steps": 150})
    thread = threading.Thread(target=go)
    thread.start()
    return thread


def test_queued_client_that_goes_away_loses_its_place_and_max_queue(assets):
    from server.app import create_app

    app = create_app(config(assets, max_queue=1))
    worker = app.state.server.worker
    with live_server(app) as (host, port):
        url = f"http://{host}:{port}"
        answers = {}
        thread = _long_run(url, answers)
        wait_until(lambda: requests.get(f"{url}/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1)
        gone = _raw_post(host, port, QUICK)
        wait_until(lambda: worker.queued() == 1)
        assert requests.get(f"{url}/sdapi/v1/progress").json()["textinfo"] == "1 waiting"
        # the queue is full: the next one is answered 503 at once
        r = requests.post(f"{url}/sdapi/v1/txt2img", json=QUICK)
        assert r.status_code == 503 and "queue is full" in r.json()["detail"]
        gone.close()
        wait_until(lambda: worker.queued() == 0, timeout=10)
        state = requests.get(f"{url}/sdapi/v1/progress").json()["state"]
        assert state["job_count"] == 1 and state["sampling_steps"] == 150  # still the long run
        # a client killed while its own job runs: the job stops, the next request is unaffected
        requests.post(f"{url}/sdapi/v1/interrupt")
        thread.join(60)
        assert answers["long"].status_code == 200
        running = _raw_post(host, port, {**QUICK, "steps": 150})
        wait_until(lambda: requests.get(f"{url}/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1)
        running.close()
        wait_until(lambda: not worker.running(), timeout=30)
        r = requests.post(f"{url}/sdapi/v1/txt2img", json=QUICK)
        assert r.status_code == 200 and len(r.json()["images"]) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_running_job_and_exits_0(tmp_path):
    port = _free_port()
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "LDM_HASH_CACHE": ""}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port)], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            try:
                return requests.get(f"{url}/sdapi/v1/samplers", timeout=1).status_code == 200
            except requests.ConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                return False
        wait_until(ready, timeout=120, every=0.2)
        answers = {}

        def go():
            answers["r"] = requests.post(f"{url}/sdapi/v1/txt2img", json={**QUICK, "steps": 8})
        thread = threading.Thread(target=go)
        thread.start()
        wait_until(lambda: requests.get(f"{url}/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1,
                   timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        thread.join(10)
        r = answers["r"]
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        assert json.loads(r.json()["info"])["steps"] == 8
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cors_is_off_unless_asked(assets, client):
    from fastapi.testclient import TestClient

    from server.app import create_app

    headers = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.get("/sdapi/v1/samplers", headers=headers).headers
    app = create_app(config(assets, api_auth="ann:secret", cors_allow_origins=["http://app.example"]))
    with TestClient(app) as c:
        r = c.options("/sdapi/v1/txt2img", headers=headers)  # a preflight carries no credentials
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = c.get("/sdapi/v1/samplers", headers={"Origin": "http://evil.example"}, auth=("ann", "secret"))
        assert "access-control-allow-origin" not in r.headers
