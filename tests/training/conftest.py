"""Trainer tests switch on deterministic mode and fix thread counts: restore both afterwards so
other tests in the same process run as before."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_global_state():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)
