"""Poll intervals, full jitter, Retry-After and the pacer: tables with a fixed clock and seeded randomness."""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import UTC, datetime

import pytest

from poller.domain.schedule import (
    Intervals,
    Pacer,
    error_delay,
    full_jitter,
    page_spacing,
    parse_retry_after,
    retrieve_delay,
    walk_period,
)

BASE = {"validating": 10.0, "in_progress": 30.0, "finalizing": 5.0}
INTERVALS = Intervals(base=BASE, growth=1.5, max_interval=300.0, default=20.0)


def fixed(value: float) -> random.Random:
    """A random source whose every draw is `value`."""

    class Fixed(random.Random):
        def random(self) -> float:
            return value

    return Fixed()


# -- Intervals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "previous", "changed", "expected"),
    [
        pytest.param("in_progress", None, False, 30.0, id="first-poll-base"),
        pytest.param("validating", None, True, 10.0, id="first-poll-base-validating"),
        pytest.param("in_progress", 30.0, False, 45.0, id="grows-while-unchanged"),
        pytest.param("in_progress", 45.0, False, 67.5, id="grows-again"),
        pytest.param("in_progress", 250.0, False, 300.0, id="capped"),
        pytest.param("in_progress", 300.0, False, 300.0, id="stays-at-cap"),
        pytest.param("in_progress", 300.0, True, 30.0, id="reset-after-change"),
        pytest.param("validating", 120.0, True, 10.0, id="reset-to-new-status-base"),
        pytest.param("cancelling", None, False, 20.0, id="unknown-status-uses-default"),
        pytest.param("cancelling", 20.0, False, 30.0, id="default-grows-too"),
    ],
)
def test_intervals_next(status: str, previous: float | None, changed: bool, expected: float) -> None:
    assert INTERVALS.next(status, previous, changed=changed) == pytest.approx(expected)


def test_intervals_grow_geometrically_to_the_cap_then_reset() -> None:
    interval = INTERVALS.next("in_progress", None, changed=True)
    seen = [interval]
    for _ in range(12):
        interval = INTERVALS.next("in_progress", interval, changed=False)
        seen.append(interval)
    assert seen == pytest.approx([min(30.0 * 1.5**k, 300.0) for k in range(13)])
    assert INTERVALS.next("finalizing", interval, changed=True) == 5.0


def test_base_above_the_cap_is_capped() -> None:
    intervals = Intervals(base={"in_progress": 900.0}, max_interval=300.0)
    assert intervals.next("in_progress", None, changed=True) == 300.0


# -- full jitter and error delay -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("streak", "base", "cap", "ceiling"),
    [
        pytest.param(1, 5.0, 600.0, 5.0, id="first-error"),
        pytest.param(2, 5.0, 600.0, 10.0, id="second"),
        pytest.param(3, 5.0, 600.0, 20.0, id="third"),
        pytest.param(7, 5.0, 600.0, 320.0, id="seventh"),
        pytest.param(8, 5.0, 600.0, 600.0, id="capped"),
        pytest.param(60, 5.0, 600.0, 600.0, id="long-streak-capped"),
        pytest.param(1, 5.0, 2.0, 2.0, id="cap-below-base"),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2024])
def test_full_jitter_is_uniform_below_the_ceiling(
    streak: int, base: float, cap: float, ceiling: float, seed: int
) -> None:
    rng = random.Random(seed)
    reference = random.Random(seed)
    draws = [full_jitter(streak, base, cap, rng.random) for _ in range(200)]
    assert draws == pytest.approx([reference.random() * ceiling for _ in range(200)])
    assert all(0.0 <= d <= ceiling for d in draws)
    assert max(draws) > 0.9 * ceiling
    assert min(draws) < 0.1 * ceiling


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 0.0), (0.5, 10.0), (0.999, 19.98)])
def test_full_jitter_extremes(draw: float, expected: float) -> None:
    assert full_jitter(3, 5.0, 600.0, fixed(draw).random) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("draw", "retry_after", "expected"),
    [
        pytest.param(0.5, None, 10.0, id="no-retry-after"),
        pytest.param(0.5, 120.0, 120.0, id="retry-after-floor"),
        pytest.param(0.0, 3.0, 3.0, id="floor-when-jitter-zero"),
        pytest.param(0.999, 3.0, 19.98, id="floor-not-a-cap"),
        pytest.param(0.5, 0.0, 10.0, id="zero-retry-after"),
        pytest.param(0.5, 10_000.0, 10_000.0, id="floor-above-the-cap"),
    ],
)
def test_error_delay(draw: float, retry_after: float | None, expected: float) -> None:
    assert error_delay(3, 5.0, 600.0, fixed(draw).random, retry_after) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_error_delay_never_undercuts_retry_after(seed: int) -> None:
    rng = random.Random(seed)
    for streak in range(1, 12):
        for retry_after in (0.5, 7.0, 90.0, 900.0):
            assert error_delay(streak, 5.0, 600.0, rng.random, retry_after) >= retry_after


# -- Retry-After -------------------------------------------------------------------------------------

HTTP_NOW = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry-after-ms": "1500"}, 1.5, id="ms"),
        pytest.param({"retry-after-ms": "250", "retry-after": "10"}, 0.25, id="ms-preferred"),
        pytest.param({"Retry-After": "10"}, 10.0, id="seconds"),
        pytest.param({"retry-after": "0"}, 0.0, id="zero"),
        pytest.param({"RETRY-AFTER": "3"}, 3.0, id="upper-case"),
        pytest.param({"Retry-After-Ms": "2000"}, 2.0, id="ms-mixed-case"),
        pytest.param({"Retry-After": " 7 "}, 7.0, id="whitespace"),
        pytest.param({"Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0, id="http-date"),
        pytest.param({"retry-after": "Wed, 21 Oct 2015 08:28:00 GMT"}, 3600.0, id="http-date-hour"),
        pytest.param({"Retry-After": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0, id="http-date-in-the-past"),
        pytest.param({"retry-after-ms": "soon", "Retry-After": "4"}, 4.0, id="bad-ms-falls-back"),
        pytest.param({"retry-after-ms": "-5", "Retry-After": "4"}, 4.0, id="negative-ms-falls-back"),
        pytest.param({"retry-after-ms": "soon"}, None, id="bad-ms-only"),
        pytest.param({"Retry-After": "soon"}, None, id="garbage"),
        pytest.param({"Retry-After": ""}, None, id="empty"),
        pytest.param({"Retry-After": "-1"}, None, id="negative"),
        pytest.param({"Retry-After": "nan"}, None, id="nan"),
        pytest.param({"Retry-After": "inf"}, None, id="infinite"),
        pytest.param({}, None, id="absent"),
        pytest.param({"content-type": "application/json"}, None, id="unrelated"),
    ],
)
def test_parse_retry_after(headers: Mapping[str, str], expected: float | None) -> None:
    result = parse_retry_after(headers, HTTP_NOW)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


# -- Pacer -------------------------------------------------------------------------------------------


def test_pacer_spaces_requests_one_over_rate() -> None:
    pacer = Pacer(4.0)
    assert [pacer.reserve(100.0) for _ in range(5)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_pacer_does_not_bank_idle_time() -> None:
    pacer = Pacer(2.0)
    pacer.reserve(0.0)
    assert pacer.reserve(60.0) == 0.0
    assert pacer.reserve(60.0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("rate", "min_rate", "penalties", "expected"),
    [
        pytest.param(8.0, 0.2, 1, 4.0, id="halves"),
        pytest.param(8.0, 0.2, 3, 1.0, id="halves-each-time"),
        pytest.param(8.0, 0.2, 10, 0.2, id="not-below-min"),
        pytest.param(1.0, 0.3, 2, 0.3, id="min-reached-between-halvings"),
    ],
)
def test_pacer_penalize_halves_the_rate(rate: float, min_rate: float, penalties: int, expected: float) -> None:
    pacer = Pacer(rate, min_rate=min_rate)
    for i in range(penalties):
        pacer.penalize(10.0 + i, None)
    assert pacer.rate == pytest.approx(expected)


def test_pacer_penalize_pauses_until_retry_after() -> None:
    pacer = Pacer(10.0)
    pacer.penalize(100.0, 5.0)
    assert pacer.paused_until == 105.0
    assert pacer.reserve(100.0) == pytest.approx(5.0)
    assert pacer.reserve(100.0) == pytest.approx(5.0 + 1 / 5.0)  # spaced at the halved rate
    assert pacer.reserve(105.1) == pytest.approx(105.0 + 2 / 5.0 - 105.1)


def test_pacer_shorter_retry_after_does_not_end_a_pause_early() -> None:
    pacer = Pacer(10.0)
    pacer.penalize(100.0, 10.0)
    pacer.penalize(101.0, 1.0)
    assert pacer.paused_until == 110.0
    assert pacer.reserve(101.0) == pytest.approx(9.0)


def test_pacer_penalize_without_retry_after_does_not_pause() -> None:
    pacer = Pacer(10.0)
    pacer.penalize(100.0, None)
    assert pacer.reserve(100.0) == 0.0
    assert pacer.reserve(100.0) == pytest.approx(1 / 5.0)


def test_pacer_reward_recovers_only_after_the_recovery_period() -> None:
    pacer = Pacer(8.0, recovery=30.0)
    pacer.penalize(99.0, None)
    pacer.penalize(100.0, None)
    assert pacer.rate == 2.0

    pacer.reward(100.0)
    pacer.reward(129.9)
    assert pacer.rate == 2.0

    pacer.reward(130.0)
    assert 2.0 < pacer.rate <= 8.0

    now = 130.0
    for _ in range(20):
        now += 30.0
        pacer.reward(now)
        assert pacer.rate <= 8.0
    assert pacer.rate == 8.0


def test_pacer_reward_at_full_rate_changes_nothing() -> None:
    pacer = Pacer(5.0)
    pacer.reward(1_000.0)
    assert pacer.rate == 5.0
    assert [pacer.reserve(1_000.0) for _ in range(3)] == pytest.approx([0.0, 0.2, 0.4])


def test_pacer_429s_during_a_pause_extend_it_without_halving_again() -> None:
    pacer = Pacer(8.0)
    pacer.penalize(100.0, 5.0)
    pacer.penalize(100.2, 5.0)  # a request already in flight when the first 429 came back
    pacer.penalize(100.4, 5.0)
    assert pacer.rate == 4.0
    assert pacer.paused_until == pytest.approx(105.4)
    pacer.penalize(106.0, None)  # a new 429 after the pause: the rate halves again
    assert pacer.rate == 2.0


def test_pacer_configure_keeps_the_pause() -> None:
    pacer = Pacer(8.0)
    pacer.penalize(100.0, 30.0)
    pacer.configure(20.0)
    assert pacer.paused_until == 130.0
    assert pacer.max_rate == 20.0
    assert pacer.rate == 4.0


def test_pacer_a_burst_of_429s_without_retry_after_halves_once() -> None:
    pacer = Pacer(10.0)
    for i in range(8):  # eight requests in flight together all come back 429
        pacer.penalize(100.0 + i * 0.01, None)
    assert pacer.rate == 5.0


# -- the latency target: walks of the pages holding active batches -------------------------------------


@pytest.mark.parametrize(
    ("latency", "pages", "rate", "cap", "expected"),
    [
        pytest.param(15.0, 1, 10.0, 300.0, 15.0, id="one-page"),
        pytest.param(15.0, 0, 10.0, 300.0, 15.0, id="no-pages-yet"),
        pytest.param(15.0, 10, 10.0, 300.0, 30.0, id="ten-pages-two-latencies"),
        pytest.param(15.0, 100, 10.0, 300.0, 45.0, id="hundred-pages"),
        pytest.param(15.0, 1000, 10.0, 300.0, 125.0, id="rate-bound-1000-pages-at-80-percent-of-10-per-s"),
        pytest.param(200.0, 10, 10.0, 300.0, 300.0, id="capped-by-max-interval"),
        pytest.param(600.0, 1, 10.0, 300.0, 300.0, id="max-interval-is-an-upper-bound"),
        pytest.param(1.0, 10, 10.0, 300.0, 2.0, id="fast"),
        pytest.param(1.0, 100, 10.0, 300.0, 12.5, id="fast-but-rate-bound"),
    ],
)
def test_walk_period(latency: float, pages: int, rate: float, cap: float, expected: float) -> None:
    assert walk_period(latency, pages, rate, cap=cap) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("period", "pages", "page_work", "expected"),
    [
        pytest.param(30.0, 1000, [], 0.0, id="no-walk-known-yet"),
        pytest.param(30.0, 3, [0.002, 0.001], 0.0025, id="quick-walks-stay-quick"),
        pytest.param(30.0, 1000, [0.014, 0.018, 0.015], 0.0225, id="the-slowest-recent-walk-sets-the-pace"),
        pytest.param(30.0, 1000, [0.023], 0.024, id="never-over-more-than-80-percent-of-the-period"),
        pytest.param(30.0, 1000, [0.057], 0.024, id="a-first-sight-slower-than-a-period"),
        pytest.param(30.0, 2, [0.5], 0.625, id="a-short-walk-keeps-its-own-pace"),
    ],
)
def test_page_spacing(period: float, pages: int, page_work: list[float], expected: float) -> None:
    assert page_spacing(period, pages, page_work) == pytest.approx(expected)


def test_walk_period_requests_per_hour_at_the_default_target() -> None:
    """The README table: one walk of `pages` pages per period."""
    per_hour = {pages: 3600 * pages / walk_period(15.0, pages, 10.0, cap=300.0) for pages in (1, 10, 100)}
    assert per_hour == pytest.approx({1: 240.0, 10: 1200.0, 100: 8000.0})


@pytest.mark.parametrize(
    ("base", "eta", "expires_in", "expected"),
    [
        pytest.param(30.0, None, None, 30.0, id="no-estimate"),
        pytest.param(30.0, 12.0, None, 12.0, id="due-at-its-estimated-completion"),
        pytest.param(30.0, 1.0, None, 5.0, id="near-completion-every-floor"),
        pytest.param(30.0, 200.0, None, 100.0, id="far-half-the-distance"),
        pytest.param(30.0, 10_000.0, None, 300.0, id="far-capped"),
        pytest.param(30.0, None, 20.0, 21.0, id="just-after-expiry"),
        pytest.param(30.0, None, 2.0, 5.0, id="expiry-within-the-floor"),
        pytest.param(30.0, None, -20.0, 5.0, id="just-expired-keep-the-floor"),
        pytest.param(30.0, None, -100.0, 30.0, id="long-expired-back-to-the-interval"),
        pytest.param(30.0, 200.0, 40.0, 41.0, id="expiry-before-the-estimate"),
    ],
)
def test_retrieve_delay(base: float, eta: float | None, expires_in: float | None, expected: float) -> None:
    assert retrieve_delay(base, floor=5.0, eta=eta, expires_in=expires_in, cap=300.0) == pytest.approx(expected)
