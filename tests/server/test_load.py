"""A quick version of ``benchmarks/server_load.py``: concurrent clients against one worker get
every answer, and each image is the one the request gets alone (the Python API's)."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks import server_load

from .conftest import config, live_server

pytestmark = pytest.mark.usefixtures("single_thread")


def test_concurrent_clients_get_the_images_of_their_requests_alone(assets, pipe):
    from server.app import create_app

    reqs = server_load.requests_for(clients=4, per_client=2, steps=2)
    _, reference = server_load.loop(pipe, reqs)
    with live_server(create_app(config(assets))) as (host, port):
        r = server_load.round_of(f"http://{host}:{port}", reqs, clients=4)
    statuses = [x[0] for x in r["results"]]
    assert statuses == [200] * len(reqs)
    for (_, _, image), ref in zip(r["results"], reference):
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ref))


@pytest.mark.slow
def test_the_load_benchmark_bars(tmp_path):
    """The whole benchmark: 8 clients × 5 requests, two rounds, against the in-process loop."""
    figures = server_load.run(clients=8, per_client=5, steps=10)
    assert figures["bars"]["0 errors"] and figures["bars"]["all identical"]
    assert figures["bars"]["RSS within 10 %"]
