"""Load on ``ldm serve``: concurrent A1111 clients against a warm in-process loop.

    python -m benchmarks.server_load [--clients 8] [--requests 5] [--steps 10] [--threads 1]
                                     [--out benchmarks/out] [--quick]

The server runs as its own process (``python -m cli serve`` on a free loopback port, the shipped
default model), so its resident memory is its own. Steps:

1. In this process, a warm Python-API loop makes every request's image once, serially (the
   reference images, and the loop's throughput);
2. two rounds of ``--clients`` threads each posting ``--requests`` txt2img requests at once
   (distinct prompts and seeds, ``requests`` sessions): every answer must be 200, every image
   bit-identical to the loop's image for that request; latency per request (queueing included),
   the round's throughput, and the server's RSS after each round;
3. the loop again after each round, so that a drift of the machine's speed shows in the loop
   figures (before, between and after the rounds).

The bars: 0 errors, every image identical, RSS after round 2 within 10 % of round 1, and the
server's throughput ≥ 0.9 × the loop's: each round against the mean of the loop runs just before
and after it (the machine's speed drifts), averaged over the rounds. ``torch`` runs ``--threads``
intra-op threads on both sides.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a red circle", "a blue square", "a green triangle on white", "a yellow star",
           "two red circles", "a purple square on black", "an orange triangle", "a white circle")


def requests_for(clients: int, per_client: int, steps: int) -> list[dict]:
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i, "steps": steps, "width": 64,
             "height": 64, "cfg_scale": 5, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}
            for i in range(clients * per_client)]


def loop(pipe, reqs: list[dict]) -> tuple[float, list]:
    """The warm in-process loop: one Python-API call per request, serially."""
    images = []
    start = time.perf_counter()
    for r in reqs:
        images.append(pipe.txt2img(r["prompt"], seed=r["seed"], num_inference_steps=r["steps"],
                                   guidance_scale=r["cfg_scale"], scheduler="dpmpp_2m_karras",
                                   width=r["width"], height=r["height"], progress=False).images[0])
    return time.perf_counter() - start, images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int):
    import requests

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    log = tempfile.TemporaryFile("w+")  # read back only if it fails to start
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited: {log.read()[-2000:]}")
        try:
            if requests.get(f"{url}/sdapi/v1/options", timeout=5).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def round_of(url: str, reqs: list[dict], clients: int) -> dict:
    """``clients`` threads, each posting its share of ``reqs`` one after another."""
    import requests
    from PIL import Image

    results: list = [None] * len(reqs)
    per = len(reqs) // clients
    barrier = threading.Barrier(clients)

    def client(c: int):
        session = requests.Session()
        barrier.wait()
        for i in range(c * per, (c + 1) * per):
            t = time.perf_counter()
            try:
                r = session.post(f"{url}/sdapi/v1/txt2img", json=reqs[i], timeout=600)
                image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))) \
                    if r.status_code == 200 else None
                results[i] = (r.status_code, time.perf_counter() - t, image)
            except Exception as exc:  # counted as an error
                results[i] = (repr(exc), time.perf_counter() - t, None)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"wall": wall, "results": results}


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def run(clients: int = 8, per_client: int = 5, steps: int = 10, threads: int = 1) -> dict:
    import numpy as np
    import psutil
    import torch

    from pipelines.pipeline import Pipeline

    torch.set_num_threads(threads)
    reqs = requests_for(clients, per_client, steps)
    pipe = Pipeline.from_checkpoint()
    loop(pipe, reqs[:2])  # warm: scheduler import, first allocations
    first, reference = loop(pipe, reqs)
    loop_s = [first]
    proc, url = start_server(threads)
    try:
        import requests
        requests.post(f"{url}/sdapi/v1/txt2img", json=reqs[0], timeout=600)  # warm the server
        rounds = []
        for _ in range(2):  # loop, round, loop, round, loop: drift shows in the loop figures
            r = round_of(url, reqs, clients)
            r["rss"] = psutil.Process(proc.pid).memory_info().rss
            rounds.append(r)
            loop_s.append(loop(pipe, reqs)[0])
    finally:
        proc.terminate()
        proc.wait(60)
    loop_rate = len(reqs) / statistics.mean(loop_s)
    figures = {"clients": clients, "requests_per_client": per_client, "steps": steps,
               "threads": threads, "loop_s": loop_s, "loop_images_per_s": loop_rate,
               "rounds": []}
    for i, r in enumerate(rounds):
        ok = [x for x in r["results"] if x[0] == 200]
        identical = sum(1 for x, ref in zip(r["results"], reference)
                        if x[2] is not None and np.array_equal(np.asarray(x[2].convert("RGB")),
                                                               np.asarray(ref)))
        latency = [x[1] for x in r["results"]]
        figures["rounds"].append({
            "answers": len(ok), "errors": len(reqs) - len(ok), "identical": identical,
            "wall_s": r["wall"], "images_per_s": len(reqs) / r["wall"],
            # against the loops run just before and just after this round: the machine's drift
            "vs_adjacent_loops": statistics.mean(loop_s[i:i + 2]) / r["wall"],
            "p50_s": statistics.median(latency), "p95_s": _pct(latency, 0.95),
            "rss_mb": r["rss"] / 2**20})
    first, second = figures["rounds"]
    figures["rss_change"] = second["rss_mb"] / first["rss_mb"] - 1
    figures["server_vs_loop"] = statistics.mean(r["vs_adjacent_loops"] for r in figures["rounds"])
    figures["bars"] = {
        "0 errors": all(r["errors"] == 0 for r in figures["rounds"]),
        "all identical": all(r["identical"] == len(reqs) for r in figures["rounds"]),
        "RSS within 10 %": abs(figures["rss_change"]) <= 0.10,
        "server >= 0.9 x loop": figures["server_vs_loop"] >= 0.9}
    return figures


def markdown(f: dict) -> str:
    rows = [f"{f['clients']} clients × {f['requests_per_client']} requests, default model 64×64, "
            f"{f['steps']} DPM++ 2M Karras steps, torch threads {f['threads']}", "",
            "| | answers / errors | identical to the loop | wall (s) | images/s | vs loop | p50 (s) | p95 (s) | server RSS (MB) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(f["rounds"], 1):
        rows.append(f"| round {i} | {r['answers']} / {r['errors']} | {r['identical']} | "
                    f"{r['wall_s']:.2f} | {r['images_per_s']:.3f} | {r['vs_adjacent_loops']:.2f} | "
                    f"{r['p50_s']:.2f} | "
                    f"{r['p95_s']:.2f} | {r['rss_mb']:.0f} |")
    rows.append(f"| in-process loop (before / between / after) | – | – | "
                f"{' / '.join(f'{s:.2f}' for s in f['loop_s'])} | {f['loop_images_per_s']:.3f} "
                "| 1 | – | – | – |")
    rows += ["", f"Server throughput / loop (each round against its adjacent loops, mean): "
             f"{f['server_vs_loop']:.2f}; RSS change round 1 → 2: "
             f"{100 * f['rss_change']:+.1f} %.", "",
             "Bars: " + ", ".join(f"{k}: {'met' if v else '**NOT met**'}" for k, v in f["bars"].items())]
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=5, help="per client")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="3 clients × 2 requests, 2 steps")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    a = p.parse_args(argv)
    if a.quick:
        a.clients, a.requests, a.steps = 3, 2, 2
    figures = run(a.clients, a.requests, a.steps, a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "server_load.json").write_text(json.dumps(figures, indent=1))
    (out / "server_load.md").write_text(markdown(figures) + "\n")
    print(markdown(figures))
    return 0 if all(figures["bars"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
