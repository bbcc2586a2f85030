"""Soft labels softmax(T * score) over the observed experts, and their inversion."""

from __future__ import annotations

import math

import numpy as np
import pytest

from torouter.labels import DEFAULT_TEMPERATURE, fit_offset, quality_from_log_probs, soft_labels

NAN = float("nan")


def test_default_temperature_is_ten():
    assert DEFAULT_TEMPERATURE == 10.0


def test_two_experts_by_hand():
    # softmax(10 * [0.6, 0.5]) = [1, e^-1] / (1 + e^-1)
    y = soft_labels(np.array([[0.6, 0.5]]))
    np.testing.assert_allclose(y, [[0.7310585786300049, 0.2689414213699951]], rtol=1e-12)


def test_three_experts_by_hand():
    # Z = e^10 + e^5 + e^0
    z = math.exp(10) + math.exp(5) + 1
    y = soft_labels(np.array([[1.0, 0.5, 0.0]]), temperature=10)
    np.testing.assert_allclose(y, [[math.exp(10) / z, math.exp(5) / z, 1 / z]], rtol=1e-12)
    np.testing.assert_allclose(y, [[0.9932623568421743, 0.006692549116589287, 4.509404123635488e-05]], rtol=1e-9)


def test_temperature_one_by_hand():
    y = soft_labels(np.array([[0.6, 0.5]]), temperature=1.0)
    np.testing.assert_allclose(y, [[0.52497918747894, 0.47502081252106]], rtol=1e-12)


def test_rows_are_independent_and_sum_to_one():
    scores = np.array([[0.6, 0.5], [0.0, 0.0], [0.2, 0.9]])
    y = soft_labels(scores)
    np.testing.assert_allclose(y.sum(axis=1), 1.0)
    np.testing.assert_allclose(y[0], soft_labels(scores[:1])[0])
    np.testing.assert_allclose(y[1], [0.5, 0.5])
    assert y[2, 1] > y[2, 0]


def test_unobserved_nan_gets_zero_weight():
    y = soft_labels(np.array([[0.6, NAN, 0.5]]))
    assert y[0, 1] == 0.0
    np.testing.assert_allclose(y, [[0.7310585786300049, 0.0, 0.2689414213699951]], rtol=1e-12)


def test_explicit_mask_overrides_observed_values():
    # the 0.9 is masked out: it must not take weight, and must not be read as 0 either
    scores = np.array([[0.6, 0.9, 0.5]])
    mask = np.array([[True, False, True]])
    y = soft_labels(scores, mask)
    np.testing.assert_allclose(y, [[0.7310585786300049, 0.0, 0.2689414213699951]], rtol=1e-12)


def test_unobserved_is_not_read_as_zero_score():
    # an expert observed with score 0 still takes some weight; an unobserved one takes none
    observed_zero = soft_labels(np.array([[0.5, 0.0]]))
    unobserved = soft_labels(np.array([[0.5, NAN]]))
    assert observed_zero[0, 1] > 0
    assert unobserved[0].tolist() == [1.0, 0.0]


def test_small_temperature_is_nearly_uniform():
    y = soft_labels(np.array([[1.0, 0.0, 0.5, NAN]]), temperature=1e-6)
    np.testing.assert_allclose(y[0, :3], 1 / 3, atol=1e-6)
    assert y[0, 3] == 0.0


def test_large_temperature_is_one_hot_and_shares_ties():
    y = soft_labels(np.array([[0.9, 0.8, 0.1]]), temperature=1e4)
    np.testing.assert_allclose(y, [[1.0, 0.0, 0.0]], atol=1e-12)
    tied = soft_labels(np.array([[1.0, 1.0, 0.2]]), temperature=1e4)
    np.testing.assert_allclose(tied, [[0.5, 0.5, 0.0]], atol=1e-12)


def test_higher_temperature_sharpens():
    s = np.array([[0.7, 0.4]])
    tops = [soft_labels(s, temperature=t)[0, 0] for t in (0.5, 1, 5, 10, 50)]
    assert all(a < b for a, b in zip(tops, tops[1:]))


def test_huge_temperature_does_not_overflow():
    y = soft_labels(np.array([[1.0, 0.999]]), temperature=1e6)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, [[1.0, 0.0]], atol=1e-12)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_rejected(temperature):
    with pytest.raises(ValueError, match="temperature must be positive"):
        soft_labels(np.array([[0.5, 0.5]]), temperature=temperature)


def test_row_without_observed_expert_rejected():
    with pytest.raises(ValueError, match="row 1 has no observed expert"):
        soft_labels(np.array([[0.5, 0.2], [NAN, NAN]]))
    with pytest.raises(ValueError, match="row 0 has no observed expert"):
        soft_labels(np.array([[0.5, 0.2]]), np.array([[False, False]]))


def test_quality_from_log_probs_recovers_score_differences():
    scores = np.array([[0.9, 0.3, 0.6], [0.1, 0.2, 0.25]])
    log_y = np.log(soft_labels(scores, temperature=4.0))
    q = quality_from_log_probs(log_y, 4.0)
    # log y / T = s - log Z / T: scores up to one constant per row
    np.testing.assert_allclose(q - q[:, :1], scores - scores[:, :1], atol=1e-12)
    np.testing.assert_allclose(quality_from_log_probs(log_y, 4.0, offset=0.5), q + 0.5)


def test_fit_offset_by_hand():
    # one row [0.6, 0.5] at T=10: log y = [-L, -1 - L] with L = log(1 + e^-1),
    # so s - log y / T = 0.6 + L / 10 for both experts
    scores = np.array([[0.6, 0.5]])
    log_y = np.log(soft_labels(scores))
    offset = fit_offset(log_y, scores, np.array([[True, True]]), 10.0)
    assert offset == pytest.approx(0.6 + 0.31326168751822286 / 10, abs=1e-12)
    # with the offset the scores are recovered exactly
    np.testing.assert_allclose(quality_from_log_probs(log_y, 10.0, offset), scores, atol=1e-12)


def test_fit_offset_ignores_unobserved_entries():
    log_probs = np.array([[-1.0, -2.0], [-3.0, -4.0]])
    scores = np.array([[0.5, NAN], [0.2, 0.9]])
    mask = ~np.isnan(scores)
    # residuals s - lp / 2 over observed: 0.5+0.5, 0.2+1.5, 0.9+2.0 -> mean (1.0 + 1.7 + 2.9) / 3
    assert fit_offset(log_probs, scores, mask, 2.0) == pytest.approx((1.0 + 1.7 + 2.9) / 3)
