"""``mfac_core._summation.sum_in_pairs``: the sum, its order, its rounding."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from mfac_core._summation import sum_in_pairs


def test_the_sum_of_any_count_of_parts():
    rng = np.random.default_rng(0)
    for count in (1, 2, 3, 7, 64, 65, 1000):
        parts = rng.integers(-(2**20), 2**20, size=(count, 3)).astype(np.float64)
        np.testing.assert_array_equal(sum_in_pairs(parts), parts.sum(axis=0))  # exact here
    one = np.ones(4)
    assert sum_in_pairs([one]) is one
    with pytest.raises(ValueError, match="at least one"):
        sum_in_pairs([])


def test_parts_of_one_sign_and_size_do_not_lean_one_way():
    """4096 partial sums of about one size (as the pieces of a product near the gradients'
    span): added one after the other their roundings lean one way; in pairs they do not."""
    rng = np.random.default_rng(0)
    parts = (1.0 + rng.random(4096) * 2.0**-20) * (4 / 3)
    exact = math.fsum(parts)
    ordered = functools.reduce(lambda a, b: a + b, parts)
    eps = np.finfo(np.float64).eps
    assert abs(sum_in_pairs(parts) - exact) <= 4 * eps * exact
    assert abs(ordered - exact) > 16 * eps * exact  # the sum this replaces: 23 eps
