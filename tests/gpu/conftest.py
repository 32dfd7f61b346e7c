"""GPU tests share one card, also when pytest-xdist runs them in several processes: a test marked
``gpu_exclusive`` (a tensor of more than 2**31 elements, 65,536+ positions against float64) takes
an exclusive file lock and runs alone; every other GPU test holds the lock shared and returns its
cached blocks to the driver before it lets go (captured CUDA graphs released first), so an exclusive test finds the card's memory free.
"""

import fcntl
import os
import tempfile

import pytest
import torch

_LOCK = os.path.join(tempfile.gettempdir(), "ssmkit-gpu-tests.lock")


@pytest.fixture(autouse=True)
def _share_the_card(request):
    if not torch.cuda.is_available():
        yield
        return
    exclusive = request.node.get_closest_marker("gpu_exclusive") is not None
    with open(_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            from ssmkit.inference.cuda_graph import clear_graphs

            clear_graphs()  # captured graphs hold their memory pools
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            fcntl.flock(f, fcntl.LOCK_UN)
