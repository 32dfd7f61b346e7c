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


def test_fused_forms_registered_explicitly_not_on_import():
    """The fused kernel modules call no ``register`` (importing them has no side effect); the
    forms come from ssmkit.ops.fused.register_forms(), which ssmkit.ops calls once."""
    import ast
    import pathlib

    import ssmkit.ops.fused as fused

    folder = pathlib.Path(fused.__file__).parent
    for name in ("decode.py", "gemv.py", "norm.py"):
        tree = ast.parse((folder / name).read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", getattr(n.func, "attr", None)) == "register"]
        assert not calls, f"{name} registers forms on import"
    for op in ("add_rms_norm", "norm_linear", "causal_conv1d_step_proj", "selective_scan_step_parts"):
        assert "reference" in dispatch.available(op), op


def test_form_registered_without_auto_is_used_only_when_asked_for(monkeypatch):
    """A form registered with auto=False (not yet measured faster) is passed over by "auto" on
    CUDA, and used when named or forced."""
    monkeypatch.setattr(dispatch, "_TRITON_INSTALLED", True)
    dispatch.register("_toy", "triton", auto=False)(lambda x: "triton")
    try:
        forms = dispatch._registry["_toy"]
        cuda = torch.device("cuda")
        assert dispatch._auto("_toy", forms, cuda) == "chunked"
        with dispatch.force_backend("triton"):
            assert dispatch._auto("_toy", forms, cuda) == "triton"
        dispatch.register("_toy", "triton")(lambda x: "triton")  # re-registered for "auto"
        assert dispatch._auto("_toy", forms, cuda) == "triton"
    finally:
        dispatch._not_auto.discard(("_toy", "triton"))
