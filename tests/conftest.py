"""Test conventions: fixed seeds, a ``gpu`` marker that skips without CUDA, Triton kernels run
under ``TRITON_INTERPRET=1`` on CPU when there is no GPU (set here, before anything imports them),
and a guard that fails any test leaving process-wide state changed (see ``_global_state``)."""

from ssmkit.testing import seed_all, use_triton_interpreter

use_triton_interpreter()

import importlib.util  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

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


@pytest.fixture
def onednn_calls(monkeypatch):
    """How often ``ssmkit.ops.cpu_linear`` runs oneDNN's product during the test (a one-item list)."""
    from ssmkit.ops import cpu_linear

    n = [0]
    real = cpu_linear._onednn

    def counted(*args):
        n[0] += 1
        return real(*args)

    monkeypatch.setattr(cpu_linear, "_onednn", counted)
    return n


# Set by pytest per test, by torch on its first compile for its own cache, or by scikit-learn when
# it is first imported (lm-eval imports it): not a test's doing.
_IGNORED_ENV = ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
                "KMP_DUPLICATE_LIB_OK")


def _snapshot() -> dict:
    from ssmkit.ops import dispatch

    snap = {
        "dispatch registry": {op: dict(forms) for op, forms in dispatch._registry.items()},
        "forced backend": getattr(dispatch._local, "forced", None),
        "torch threads": torch.get_num_threads(),
        "torch deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch default dtype": torch.get_default_dtype(),
        "torch grad mode": torch.is_grad_enabled(),
        "environment": {k: v for k, v in os.environ.items() if k not in _IGNORED_ENV},
    }
    scan = sys.modules.get("ssmkit.ops.selective_scan.triton")
    if scan is not None:
        snap["selective-scan kernel config"] = scan.get_config()
    cpu_compile = sys.modules.get("ssmkit.ops.cpu_compile")
    if cpu_compile is not None:
        snap["compiled CPU kernels"] = cpu_compile._forced
    return snap


def _registry_changes(before: dict, after: dict) -> list[str]:
    """Forms removed or replaced, or added by anything but the import of an ssmkit module (an op
    module registers its forms when first imported, which is not state a test leaves behind)."""
    out = []
    for op in sorted(set(before) | set(after)):
        b, a = before.get(op, {}), after.get(op, {})
        for form in sorted(set(b) | set(a)):
            if form not in a:
                out.append(f"{op}/{form} removed")
            elif form not in b:
                if not getattr(a[form], "__module__", "").startswith("ssmkit."):
                    out.append(f"{op}/{form} registered by {getattr(a[form], '__module__', '?')}")
            elif a[form] is not b[form]:
                out.append(f"{op}/{form} replaced")
    return out


def _restore(snap: dict) -> None:
    from ssmkit.ops import dispatch

    dispatch._registry.clear()
    dispatch._registry.update({op: dict(f) for op, f in snap["dispatch registry"].items()})
    dispatch._local.forced = snap["forced backend"]
    torch.set_num_threads(snap["torch threads"])
    torch.use_deterministic_algorithms(snap["torch deterministic algorithms"])
    torch.set_default_dtype(snap["torch default dtype"])
    torch.set_grad_enabled(snap["torch grad mode"])
    for k in [k for k in os.environ if k not in _IGNORED_ENV and k not in snap["environment"]]:
        del os.environ[k]
    os.environ.update(snap["environment"])
    if "selective-scan kernel config" in snap:
        sys.modules["ssmkit.ops.selective_scan.triton"].set_config(snap["selective-scan kernel config"])
    if "compiled CPU kernels" in snap:
        sys.modules["ssmkit.ops.cpu_compile"].set_cpu_compile(snap["compiled CPU kernels"])


@pytest.fixture(autouse=True)
def _global_state():
    """Fail a test that leaves process-wide state changed (dispatch registry or forced backend,
    torch threads / determinism / default dtype / grad mode, environment variables, the scan
    kernel config), and put the state back so the tests after it are not affected."""
    before = _snapshot()
    yield
    after = _snapshot()
    changed = _registry_changes(before["dispatch registry"], after["dispatch registry"])
    for key in before:
        if key == "dispatch registry":
            continue
        if key == "environment":
            env_b, env_a = before[key], after[key]
            changed += [f"environment variable {k}" for k in sorted(set(env_b) | set(env_a)) if env_b.get(k) != env_a.get(k)]
        elif before[key] != after[key]:
            changed.append(f"{key}: {before[key]!r} -> {after[key]!r}")
    if changed:
        _restore(before)
        pytest.fail("the test left process-wide state changed: " + "; ".join(changed), pytrace=False)


try:  # Hypothesis: deterministic and without deadlines (CPU timing varies under load).
    from hypothesis import settings

    settings.register_profile("ssmkit", deadline=None, derandomize=True, print_blob=True)
    settings.load_profile("ssmkit")
except ImportError:  # pragma: no cover
    pass


# ------------------------------------------------------------------------------------------------
# --dir-times: the suite's time per test directory (setup + call + teardown, summed over workers),
# printed at the end, so a change can see what it adds to CI's budget (docs/contributing.md).
_DIR_TIMES: dict[str, float] = {}


def pytest_addoption(parser):
    parser.addoption("--dir-times", action="store_true", help="print the summed test time per tests/ directory")


def pytest_runtest_logreport(report):
    parts = report.nodeid.split("::")[0].split("/")
    key = "/".join(parts[:2]) if len(parts) > 2 else parts[0]
    _DIR_TIMES[key] = _DIR_TIMES.get(key, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not config.getoption("--dir-times") or not _DIR_TIMES:
        return
    tr = terminalreporter
    tr.section("test time per directory (summed over workers)")
    for key, t in sorted(_DIR_TIMES.items(), key=lambda kv: -kv[1]):
        tr.write_line(f"{t:8.1f} s  {key}")
    tr.write_line(f"{sum(_DIR_TIMES.values()):8.1f} s  total")


@pytest.fixture
def cpu_compiled():
    """The compiled CPU kernels on (``ssmkit.ops.cpu_compile``), one torch thread (compiled code is
    specialised on the thread count); both restored after the test."""
    from ssmkit.ops.cpu_compile import set_cpu_compile

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    set_cpu_compile(True)
    yield
    set_cpu_compile(None)
    torch.set_num_threads(n)
