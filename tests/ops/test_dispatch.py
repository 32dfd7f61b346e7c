import pytest
import torch

from ssmkit.ops import dispatch


@pytest.fixture(autouse=True)
def _toy_op():
    """A toy op with two forms, registered for each test and removed after it."""
    dispatch.register("_toy", "reference")(lambda x: "reference")
    dispatch.register("_toy", "chunked")(lambda x: "chunked")
    yield
    dispatch._registry.pop("_toy")


def test_auto_picks_chunked_on_cpu():
    x = torch.zeros(1)
    assert dispatch.get("_toy", "auto", x)(x) == "chunked"


def test_force_backend():
    x = torch.zeros(1)
    with dispatch.force_backend("reference"):
        assert dispatch.get("_toy", "auto", x)(x) == "reference"
    assert dispatch.get("_toy", "auto", x)(x) == "chunked"


def test_explicit_backend_and_errors():
    x = torch.zeros(1)
    assert dispatch.get("_toy", "reference", x)(x) == "reference"
    with pytest.raises(ValueError, match="backend='triton' is not available"):
        dispatch.get("_toy", "triton", x)
    with pytest.raises(KeyError):
        dispatch.get("_nope", "auto", x)
    with pytest.raises(ValueError):
        with dispatch.force_backend("bogus"):
            pass


def test_programmatic_launch_only_on_cuda():
    assert dispatch.programmatic_launch(torch.zeros(1)) is False
    assert dispatch.launch_options(False) == {}
    assert dispatch.launch_options(True) == {"launch_pdl": True}
