"""Suite-wide settings: tiny models run fastest, and least disturbed by other load, on one thread."""
import os

import torch


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("LDM_TEST_THREADS", "1")))
