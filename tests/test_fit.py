"""Fits recover known parameters from synthetic measurements; bad samples are refused."""

import numpy as np
import pytest

from cost_models.cluster import ExpertShape
from cost_models.files import InputError
from cost_models.fit import fit_affine, fit_compute, fit_link


def test_compute_fit_recovers_known_parameters_under_noise():
    rng = np.random.default_rng(0)
    a, b = 8e-4, 3e-5
    n = np.repeat([1, 8, 32, 128, 256, 512, 1024, 2048, 4096], 3)
    t = (a + b * n) * (1 + 0.02 * rng.standard_normal(n.size))  # 2% multiplicative noise
    model = fit_compute(n, t)
    assert model.a == pytest.approx(a, rel=0.05)
    assert model.b == pytest.approx(b, rel=0.03)
    fit = model.fit
    assert len(fit["samples"]) == n.size and len(fit["residuals"]) == n.size
    assert fit["r2"] > 0.99 and fit["max_rel_error"] < 0.1
    np.testing.assert_allclose(np.array(fit["samples"])[:, 1] - (model.a + model.b * n), fit["residuals"],
                               atol=1e-12)


def test_link_fit_recovers_latency_and_bandwidth_over_1k_to_64m():
    rng = np.random.default_rng(1)
    alpha, beta = 50e-6, 2.5e9
    sizes = 2.0 ** np.arange(10, 27)
    t = (alpha + sizes / beta) * (1 + 0.03 * rng.standard_normal(sizes.size))
    link, fit = fit_link(sizes, t)
    # Relative weighting is what lets the small messages pin the latency down.
    assert link.alpha == pytest.approx(alpha, rel=0.05)
    assert link.beta == pytest.approx(beta, rel=0.05)
    assert fit["x"] == "bytes" and len(fit["residuals"]) == sizes.size


def test_exact_data_is_fitted_exactly():
    f = fit_affine([1, 2, 4], [3.0, 5.0, 9.0])  # y = 1 + 2x
    assert (f.intercept, f.slope) == pytest.approx((1.0, 2.0))
    assert np.abs(f.residuals).max() < 1e-12 and f.r2 == pytest.approx(1.0)


def test_negative_intercept_is_clamped_to_zero():
    # y = -1 + 2x would fit these exactly; a latency cannot be negative, so the fit goes through 0.
    f = fit_affine([1, 2, 3], [1.0, 3.0, 5.0])
    assert f.intercept == 0.0
    # With the intercept at 0 the relative-error optimum is sum(x/y)/sum(x^2/y^2).
    x, y = np.array([1.0, 2, 3]), np.array([1.0, 3, 5])
    assert f.slope == pytest.approx((x / y).sum() / (x * x / (y * y)).sum())


@pytest.mark.parametrize("x, y", [
    ([1], [1.0]),  # one sample
    ([1, 2], [1.0]),  # lengths differ
    ([4, 4, 4], [1.0, 1.1, 0.9]),  # one distinct size
    ([1, 2], [1.0, -1.0]),  # non-positive time
    ([1, 2], [1.0, float("nan")]),
    ([1, 2, 3], [3.0, 2.0, 1.0]),  # shrinking with size: no positive slope, either way
])
def test_bad_samples_raise_input_error(x, y):
    with pytest.raises(InputError):
        fit_affine(x, y)


def test_memory_per_expert():
    e = ExpertShape(hidden=2, ffn=3, dtype="bf16")
    params = 2 * 2 * 3 + 2 + 3  # two weight matrices and two biases = 17
    assert e.params == params
    # Weights and gradients in bf16 (2 bytes each), Adam state in fp32: master copy + 2 moments.
    assert e.memory_bytes(owner=False) == 2 * params * 2
    assert e.memory_bytes() == 2 * params * 2 + 12 * params


def test_noisy_small_samples_fall_back_to_absolute_error():
    # Seen on a loaded host: the 8-token sample was disturbed. Relative weighting would follow the
    # two small samples down; the absolute-error fit follows the clear growth.
    f = fit_affine([8, 64, 256], [5.8e-3, 2.6e-3, 46e-3])
    assert f.method == "absolute" and f.slope > 0
    assert fit_affine([1, 2, 4], [3.0, 5.0, 9.0]).method == "relative"
