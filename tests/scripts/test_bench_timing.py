"""The benches' own arithmetic, in the fast loop: step 1's ms per iteration from two run lengths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from train_speed import per_iteration_ms  # noqa: E402


def test_step1_ms_is_the_difference_of_two_run_lengths_per_iteration_and_chunk():
    # 10 iterations in 3.0 s, 2 in 1.0 s, over 5 chunks: 2.0 s / (5 * 8) = 50 ms
    assert per_iteration_ms([1.0, 3.0], (2, 10), 5) == pytest.approx(50.0)


def test_a_longer_run_that_took_no_longer_is_refused_not_reported_negative():
    with pytest.raises(RuntimeError, match="step 1 timing not resolved: 4 iterations took 0.900 s"):
        per_iteration_ms([1.0, 0.9], (2, 4), 1)
