"""Suite-wide settings: tiny models run fastest, and least disturbed by other load, on one thread."""
import os

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("LDM_TEST_THREADS", "1")))
    # file hashes are cached across processes (ldm.weights_io.hash_cache_path); the suite writes
    # no cache into the user's home, tests of the cache name their own file
    os.environ["LDM_HASH_CACHE"] = ""


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny-model forwards on one thread: for these sizes the thread pool costs more
    than it saves, and on a busy machine its spin-waiting makes a 40 ms forward take seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
