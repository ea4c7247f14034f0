"""``ldm serve``'s web application: AUTOMATIC1111's ``/sdapi/v1`` routes on FastAPI, and the page.

:func:`create_app` builds the app around a :class:`Server` (configured folders, options, limits,
the worker); uvicorn runs it (``cli/serve.py``). Handlers check a request and queue a job; only the
worker thread touches the model. Every error answers in A1111's ``{error, detail, body, errors}``
shape.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import a1111, jobs
from .api_models import (GenerationResponse, Img2ImgRequest, PNGInfoRequest, PNGInfoResponse,
                         ProgressResponse, Txt2ImgRequest)
from .security import (CHECKPOINT_SUFFIXES, CONTROLNET_SUFFIXES, LORA_SUFFIXES, Folder, Limits,
                       Refused, check_basic_auth, decode_image, parse_credentials)
from .worker import QueueFull, ShuttingDown, Worker

STATIC = Path(__file__).parent / "static"
PLACEHOLDER = ("<!doctype html><title>ldm serve</title><h1>ldm serve</h1><p>The API is at "
               "<code>/sdapi/v1/</code>; see <a href='/docs'>/docs</a>.</p>")


@dataclass
class ServerConfig:
    checkpoint: str | None = None  # None: the shipped default model
    models_dir: str | None = None
    lora_dir: str | None = None
    controlnet_dir: str | None = None
    embeddings_dir: str | None = None  # None: the pipeline's own (embeddings/ beside the checkpoint)
    api_auth: str | None = None  # USER:PASS[,USER:PASS...]
    max_queue: int = 0  # 0: unlimited
    devices: list = field(default_factory=lambda: [None])
    dtype: str | None = None
    cors_allow_origins: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    static_dir: Path = STATIC


def load_pipeline(dtype, embeddings_dir=None):
    """The worker's loader: a checkpoint on a device (the shipped file with its own config)."""
    def load(checkpoint: Path, device):
        from pipelines.pipeline import DEFAULT_CHECKPOINT, Pipeline

        path = None if checkpoint.resolve() == DEFAULT_CHECKPOINT.resolve() else checkpoint
        pipe = Pipeline.from_checkpoint(path, device=device, dtype=dtype)
        if embeddings_dir:
            pipe.embeddings_dir = Path(embeddings_dir)
        return pipe
    return load


class Server:
    """What the routes share: folders, options, limits, credentials and the worker."""

    def __init__(self, config: ServerConfig, loader=None):
        from pipelines.pipeline import default_model

        self.config = config
        self.credentials = parse_credentials(config.api_auth)
        self.limits = config.limits
        first = Path(config.checkpoint) if config.checkpoint else default_model()[0]
        if not first.is_file():
            raise ValueError(f"checkpoint {first}: no such file")
        self.checkpoint = first.resolve()
        self.checkpoints = Folder(config.models_dir, CHECKPOINT_SUFFIXES, "checkpoint", [first])
        self.loras = Folder(config.lora_dir, LORA_SUFFIXES, "LoRA") if config.lora_dir else None
        self.controlnets = (Folder(config.controlnet_dir, CONTROLNET_SUFFIXES, "ControlNet")
                            if config.controlnet_dir else None)
        self.options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "samples_format": "png",
                                        "eta_ddim": 0.0, "eta_ancestral": 1.0}
        self.worker = Worker(loader or load_pipeline(config.dtype, config.embeddings_dir),
                             list(config.devices),
                             config.max_queue)
        self.previews: dict = {}

    def title(self, path: Path) -> str:
        """A1111's checkpoint title: ``name.safetensors [first 10 of its sha256]``."""
        from ldm.weights_io import file_hash

        return f"{self.checkpoints.name_of(path)} [{file_hash(path)[:10]}]"

    def start(self) -> None:
        self.worker.start()
        self.loading = self.worker.submit("load", lambda pipe, control: None, self.checkpoint)

    def embedding_list(self) -> dict:
        """A1111's /embeddings: the textual-inversion files prompts may name, by word; those made
        for another text-encoder width are "skipped"."""
        from ldm.embeddings import check_fits, find_embeddings, load_embedding
        from ldm.weights_io import CheckpointError

        if self.worker.pipeline(0) is None and getattr(self, "loading", None) is not None:
            try:  # the width of the model's text encoder decides what is usable
                self.loading.future.result(timeout=600)
            except Exception:
                pass
        pipe = self.worker.pipeline(0)
        folder = self.config.embeddings_dir or (pipe.embeddings_dir if pipe else None)
        out: dict = {"loaded": {}, "skipped": {}}
        widths = pipe.text_widths() if pipe is not None else None  # SDXL: each tower's
        for word, path in (find_embeddings(folder) if folder else {}).items():
            try:
                emb = load_embedding(path)
            except Exception:  # unreadable: not offered
                continue
            entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                     "shape": emb.width, "vectors": int(emb.vectors.shape[0])}
            try:
                if widths is not None:
                    check_fits(emb, widths)
                out["loaded"][word] = entry
            except CheckpointError:
                out["skipped"][word] = entry
        return out

    def model_list(self) -> list[dict]:
        from ldm.weights_io import file_hash

        out = []
        for rel, path in self.checkpoints.files.items():
            digest = file_hash(path)
            out.append({"title": f"{rel} [{digest[:10]}]", "model_name": Path(rel).stem,
                        "hash": digest[:10], "sha256": digest, "filename": rel, "config": None})
        return out


def _error(status: int, exc: BaseException | str, kind: str | None = None, detail=None,
           headers=None) -> JSONResponse:
    text = str(exc)
    body = {"error": kind or (type(exc).__name__ if not isinstance(exc, str) else "HTTPException"),
            "detail": text if detail is None else detail, "body": "", "errors": text}
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """ASGI middleware: HTTP Basic on every path when credentials are set, and the body-size
    limit (checked from Content-Length, and while reading a body that does not say)."""

    def __init__(self, app, credentials: dict, max_body: int):
        self.app, self.credentials, self.max_body = app, credentials, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.credentials and not check_basic_auth(headers.get("authorization"), self.credentials):
            return await _error(401, "Incorrect username or password",
                                headers={"WWW-Authenticate": 'Basic realm="ldm"'})(scope, receive, send)
        too_big = _error(413, f"request body is larger than the limit of {self.max_body} bytes")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await too_big(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, total = [], 0
        while True:  # read the body under the limit, then hand it on
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_body:
                return await too_big(scope, receive, send)
            if not message.get("more_body"):
                break
        body, given = b"".join(chunks), False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, if it goes away

        return await self.app(scope, replay, send)


async def _wait(server: Server, job, request: Request):
    """The job's result; a client that goes away loses its place in the queue (or, running,
    has its job interrupted)."""
    future = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.2)
        if done:
            return future.result()
        if await request.is_disconnected():
            server.worker.withdraw(job)
            future.cancel()
            return None


def create_app(config: ServerConfig | None = None, *, loader=None, start: bool = True) -> FastAPI:
    config = config or ServerConfig()
    server = Server(config, loader)

    async def lifespan(app):
        yield
        await run_in_threadpool(server.worker.stop, True, 30)

    app = FastAPI(title="ldm serve", description="AUTOMATIC1111's API on ldm-pipeline",
                  lifespan=lifespan)
    app.state.server = server
    _handlers(app)
    _generation_routes(app, server)
    _info_routes(app, server)
    _page_routes(app, config.static_dir)
    app.add_middleware(Guard, credentials=server.credentials, max_body=config.limits.max_body_bytes)
    if config.cors_allow_origins:  # outermost, so that preflight requests need no credentials
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_allow_origins,
                           allow_methods=["*"], allow_headers=["*"], allow_credentials=True)
    if start:
        server.start()
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(Refused)
    async def refused(request, exc: Refused):
        return _error(exc.status, exc.message, "HTTPException")

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        text = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")
        if first.get("type") == "json_invalid":
            text = f"malformed JSON: {first.get('ctx', {}).get('error', 'cannot be parsed')}"
        detail = json.loads(json.dumps(errors, default=str))
        return _error(422, text, "RequestValidationError", detail)

    @app.exception_handler(StarletteHTTPException)
    async def http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, exc.detail, "HTTPException", headers=exc.headers)

    @app.exception_handler(QueueFull)
    @app.exception_handler(ShuttingDown)
    async def busy(request, exc):
        return _error(503, exc)

    @app.exception_handler(ValueError)
    async def bad_value(request, exc: ValueError):  # the pipeline's own checks of a request
        return _error(422, exc)

    @app.exception_handler(Exception)
    async def failed(request, exc: Exception):
        return _error(500, exc)


def _generation_routes(app: FastAPI, server: Server) -> None:
    async def generate(req, request: Request, mode: str):
        plan = await run_in_threadpool(jobs.plan_request, server, req, mode)
        started = time.time()
        job = server.worker.submit(mode, jobs.make_runner(plan, server.limits), plan.checkpoint)
        outcome = await _wait(server, job, request)
        if outcome is None:  # the client went away
            return Response(status_code=499)
        body = await run_in_threadpool(jobs.answer, plan, outcome, req, started, req.send_images)
        return JSONResponse(body)

    @app.post("/sdapi/v1/txt2img", response_model=GenerationResponse)
    async def txt2img(req: Txt2ImgRequest, request: Request):
        return await generate(req, request, "txt2img")

    @app.post("/sdapi/v1/img2img", response_model=GenerationResponse)
    async def img2img(req: Img2ImgRequest, request: Request):
        return await generate(req, request, "img2img")

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        server.worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        server.worker.skip()
        return {}

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False):
        running = server.worker.running()
        queued = server.worker.queued()
        textinfo = f"{queued} waiting" if queued else None
        if not running:
            idle = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                    "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                    "sampling_steps": 0}
            return {"progress": 0, "eta_relative": 0, "state": idle, "textinfo": textinfo}
        index = server.worker.states.index(running[0])
        state = running[0]
        with state.lock:
            snapshot = state.as_dict()
            control = state.current.control if state.current else None
            elapsed = time.time() - state.time_start
        done = 0.01
        if snapshot["job_count"] > 0:
            done += snapshot["job_no"] / snapshot["job_count"]
            if snapshot["sampling_steps"] > 0:
                done += snapshot["sampling_step"] / snapshot["sampling_steps"] / snapshot["job_count"]
        image = None
        if control is not None and not skip_current_image:
            image = await run_in_threadpool(_preview, server, index, control)
        return {"progress": min(done, 1.0), "eta_relative": elapsed / done - elapsed,
                "state": snapshot, "current_image": image, "textinfo": textinfo,
                "current_task": state.current.id if state.current else None}


def _preview(server: Server, index: int, control) -> str | None:
    """The first image of the batch at the last step, decoded once per step."""
    latents, key = control.latents, control.step_key
    if latents is None:
        return None
    if server.previews.get("key") == key:
        return server.previews["image"]
    import torch
    from PIL import Image

    from pipelines.latents import decode
    from pipelines.preprocess import to_uint8

    pipe = server.worker.pipeline(index)
    with torch.inference_mode():
        pixels = to_uint8(decode(pipe.model, latents[:1].to(pipe.dtype)))
    image = jobs.png_base64(Image.fromarray(pixels[0]), None)
    server.previews = {"key": key, "image": image}
    return image


def _info_routes(app: FastAPI, server: Server) -> None:
    @app.get("/sdapi/v1/options")
    async def get_options():
        title = await run_in_threadpool(server.title, server.checkpoint)
        return {**server.options, "sd_model_checkpoint": title,
                "sd_checkpoint_hash": title.rsplit("[", 1)[-1].rstrip("]")}

    @app.post("/sdapi/v1/options")
    async def set_options(options: dict[str, Any]):
        jobs.check_settings(options)
        wanted = options.get("sd_model_checkpoint")
        changes = {k: v for k, v in options.items() if k != "sd_model_checkpoint"}
        if wanted is not None:
            path = server.checkpoints.resolve(wanted, "sd_model_checkpoint")
            before, server.checkpoint = server.checkpoint, path  # requests queued from now on
            job = server.worker.submit("load", lambda pipe, control: None, path)
            try:
                await asyncio.wrap_future(job.future)  # switched between jobs, by the worker
            except Exception:
                server.checkpoint = before  # a file that does not load leaves the model as it was
                raise
        server.options.update(changes)
        return None

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return await run_in_threadpool(server.model_list)

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        await run_in_threadpool(server.checkpoints.refresh)
        return None

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return a1111.sampler_list()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return a1111.schedule_list()

    @app.get("/sdapi/v1/loras")
    async def loras():
        folder = server.loras
        return [] if folder is None else [
            {"name": Path(rel).stem, "alias": Path(rel).stem, "path": rel, "metadata": {}}
            for rel in folder.files]

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        if server.loras is not None:
            await run_in_threadpool(server.loras.refresh)
        return None

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        return await run_in_threadpool(server.embedding_list)

    @app.post("/sdapi/v1/refresh-embeddings")
    async def refresh_embeddings():
        return None

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        names = ["controlnet"] if server.controlnets is not None else []
        return {"txt2img": names, "img2img": names}

    for path in ("sd-vae", "hypernetworks", "face-restorers", "prompt-styles", "realesrgan-models"):
        app.add_api_route(f"/sdapi/v1/{path}", _empty, methods=["GET"])

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():  # those the hires fix can use (hr_upscaler), in A1111's shape
        from pipelines.hires import PIXEL_MODES

        return [{"name": name, "model_name": None, "model_path": None, "model_url": None,
                 "scale": 4} for name in PIXEL_MODES]

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        from pipelines.hires import LATENT_MODES

        return [{"name": name} for name in LATENT_MODES]

    @app.post("/sdapi/v1/png-info", response_model=PNGInfoResponse)
    async def png_info(req: PNGInfoRequest):
        image = await run_in_threadpool(decode_image, req.image, "image", server.limits)
        text = image.info.get("parameters")
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
        return {"info": text or "", "items": items,
                "parameters": a1111.read_infotext(text) if text else {}}


async def _empty():
    return []


def _page_routes(app: FastAPI, static: Path) -> None:
    """The page (another part of the project writes ``server/static``); a placeholder until then."""
    @app.get("/", include_in_schema=False)
    async def index():
        page = static / "index.html"
        return FileResponse(page) if page.is_file() else HTMLResponse(PLACEHOLDER)

    app.mount("/static", StaticFiles(directory=static, check_dir=False), name="static")

