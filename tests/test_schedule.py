import pytest

from sista_core.schedule import cosine_with_warmup


def test_warmup_rises_linearly_to_the_base_rate():
    rates = [cosine_with_warmup(s, 100, 10, 1.0) for s in range(10)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(rates, rates[1:], strict=False))


def test_cosine_decays_to_the_floor_at_the_end():
    assert cosine_with_warmup(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 100, 10, 1.0) == pytest.approx(0.505, abs=1e-3)
    assert cosine_with_warmup(100, 100, 10, 1.0) == pytest.approx(0.01)
    assert cosine_with_warmup(500, 100, 10, 1.0) == pytest.approx(0.01)
