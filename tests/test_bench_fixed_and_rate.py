"""The benchmark's split of a time into a fixed cost and a rate (bench/common.py, bench/bench_attention.py).

CPU only: the fit is arithmetic, and the decode table is built from Result rows made here."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))

import bench_attention  # noqa: E402
from common import Result, fixed_and_rate  # noqa: E402


def test_fixed_and_rate_recovers_a_line_through_its_points():
    fixed, rate = fixed_and_rate([(1, 9.0 + 58.0), (2, 9.0 + 2 * 58.0), (8, 9.0 + 8 * 58.0)])
    assert fixed == pytest.approx(9.0)
    assert rate == pytest.approx(58.0)


def test_fixed_and_rate_is_the_least_squares_line_when_points_do_not_fit_one():
    # Points (0, 0), (1, 2), (2, 1): mean x 1, mean y 1, slope 0.5, intercept 0.5.
    assert fixed_and_rate([(0, 0.0), (1, 2.0), (2, 1.0)]) == pytest.approx((0.5, 0.5))


def test_fixed_and_rate_needs_two_different_x():
    with pytest.raises(ValueError, match="two or more different x"):
        fixed_and_rate([(4, 10.0), (4, 11.0)])


def _row(batch: int, context: int, ours: float, sdpa: float, floor: float | None) -> Result:
    extra = {"batch": batch, "context": context, "tokens": batch * context}
    if floor is not None:
        extra["read_floor_paged_us"] = floor
        extra["read_floor_contiguous_us"] = floor - 1.0
    return Result("paged_attention_decode", f"B={batch} L={context}", "bfloat16", ours, sdpa, extra=extra)


def test_decode_fixed_and_rate_fits_each_batch_in_units_of_512_tokens():
    rows = [_row(256, L, 9.5 + 58.0 * L / 512, 9.7 + 57.5 * L / 512, 5.2 + 57.9 * L / 512) for L in (512, 1024, 4096)]
    rows += [_row(64, L, 7.0 + 15.0 * L / 512, 7.1 + 14.8 * L / 512, None) for L in (1024, 4096)]
    fits = bench_attention.decode_fixed_and_rate(rows)
    assert set(fits) == {64, 256}
    assert fits[256]["ours"] == pytest.approx((9.5, 58.0))
    assert fits[256]["sdpa"] == pytest.approx((9.7, 57.5))
    assert fits[256]["paged floor"] == pytest.approx((5.2, 57.9))
    assert fits[256]["contiguous floor"] == pytest.approx((4.2, 57.9))
    # Without floors at batch 64 (not timed), only the kernels are fitted.
    assert set(fits[64]) == {"ours", "sdpa"}
    assert fits[64]["ours"] == pytest.approx((7.0, 15.0))


def test_decode_fixed_and_rate_skips_a_batch_with_one_context():
    assert bench_attention.decode_fixed_and_rate([_row(8, 8192, 40.0, 42.0, 38.0)]) == {}


def test_print_fixed_and_rate_prints_a_row_per_batch(capsys):
    rows = [_row(256, L, 9.5 + 58.0 * L / 512, 9.7 + 57.5 * L / 512, None) for L in (512, 4096)]
    bench_attention.print_fixed_and_rate(bench_attention.decode_fixed_and_rate(rows))
    out = capsys.readouterr().out.splitlines()
    row = [line for line in out if line.strip().startswith("256")]
    assert len(row) == 1
    assert "9.5 +    58.00" in row[0] and "9.7 +    57.50" in row[0]
