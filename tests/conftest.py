"""Test conventions: fixed seeds, a ``gpu`` marker that skips without CUDA, and Triton kernels run
under ``TRITON_INTERPRET=1`` on CPU when there is no GPU (set here, before anything imports them)."""

from ssmkit.testing import seed_all, use_triton_interpreter

use_triton_interpreter()

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason="needs triton (pip install 'ssmkit[gpu]')")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_triton)


@pytest.fixture(autouse=True)
def _fixed_seed():
    seed_all(0)
    yield


try:  # Hypothesis: deterministic and without deadlines (CPU timing varies under load).
    from hypothesis import settings

    settings.register_profile("ssmkit", deadline=None, derandomize=True, print_blob=True)
    settings.load_profile("ssmkit")
except ImportError:  # pragma: no cover
    pass
