import pytest
import torch

from ssmkit.testing import assert_close, rel_err


def test_assert_close_reports_name_and_error():
    a = torch.ones(4, dtype=torch.float64)
    assert rel_err(a, a) == 0.0
    assert_close("same", a, a.clone(), rel=1e-12)
    with pytest.raises(AssertionError, match="thing: relative error"):
        assert_close("thing", a, a * 1.1, rel=1e-3)
