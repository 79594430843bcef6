"""The search strategies against synthetic devices whose true maximum is known."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tuner.search
from tests.unit.synthetic_devices import GiB, MiB, SyntheticDevice, table
from tuner.errors import ProbeError, SpecError
from tuner.search import MemoryLine, SearchResult, Trial, find_max_batch
from tuner.search_types import Move

PRIOR_ERRORS = (-0.10, -0.05, 0.0, 0.05, 0.10)
DEVICES = {device.name: device for device in table()}


def _search_guided(device: SyntheticDevice, prior_error: float | None) -> SearchResult:
    return find_max_batch(
        device.fits,
        capacity_bytes=device.capacity,
        prior=None if prior_error is None else device.prior(prior_error),
        max_batch_size=device.max_batch_size,
    )


def _assert_answer_rule(result: SearchResult) -> None:
    """The answer passed in its latest trial and no size at or below it failed in its latest."""
    latest = {t.batch_size: t.ok for t in result.trials}
    if result.max_batch_size == 0:
        return
    assert latest[result.max_batch_size] is True
    assert all(ok for b, ok in latest.items() if b <= result.max_batch_size)


def test_types_are_reexported() -> None:
    assert tuner.search.Trial is Trial and tuner.search.MemoryLine is MemoryLine


@pytest.mark.parametrize("prior_error", [None, *PRIOR_ERRORS])
@pytest.mark.parametrize("name", [n for n in DEVICES if n != "noisy: lucky"])
def test_guided_finds_the_exact_maximum(name: str, prior_error: float | None) -> None:
    device = DEVICES[name].fresh()
    result = _search_guided(device, prior_error)
    assert result.max_batch_size == device.true_max
    _assert_answer_rule(result)
    expected_reason = {"nothing fits": "nothing_fits", "everything fits": "max_batch_size"}
    assert result.stop_reason == expected_reason.get(name, "exact")


@pytest.mark.parametrize("prior_error", [None, *PRIOR_ERRORS])
def test_guided_with_a_lucky_pass_reports_nothing_that_fails_when_repeated(prior_error: float | None) -> None:
    """A size that passed once and fails when repeated (in any process) is caught by the line
    when it contradicts it, and otherwise by the probe's verification, which repeats the answer."""
    device = DEVICES["noisy: lucky"].fresh()
    result = _search_guided(device, prior_error)
    _assert_answer_rule(result)
    if prior_error is None or prior_error >= 0:
        # Approached from the line or from above, the lucky pass contradicts the line and is
        # repeated (and fails): the answer is exact.
        assert result.max_batch_size == device.true_max
    else:
        # Approached from below, the lucky size is only ever tried once and agrees with a line
        # that is too low: the search may report it; repeating it fails, which is what the
        # probe's verification does before it steps down.
        assert result.max_batch_size in (device.true_max, device.true_max + 1)
        repeats = [t for t in result.trials if t.batch_size == result.max_batch_size]
        if result.max_batch_size == device.true_max + 1:
            assert len(repeats) == 1 and not device.fits(result.max_batch_size).ok


def test_guided_median_trials_with_and_without_a_prior() -> None:
    with_prior = [len(_search_guided(d.fresh(), e).trials) for d in table() for e in PRIOR_ERRORS]
    without = [len(_search_guided(d.fresh(), None).trials) for d in table()]
    assert statistics.median(with_prior) <= 4
    assert statistics.median(without) <= 6


@pytest.mark.parametrize("prior_error", [None, *PRIOR_ERRORS])
@pytest.mark.parametrize("name", list(DEVICES))
def test_guided_finds_the_exact_maximum_when_failures_report_their_peaks(
    name: str, prior_error: float | None
) -> None:
    """Estimate trials trace the whole step, so a failure still knows its peak: every device,
    the lucky one included, gives its exact maximum."""
    device = dataclasses.replace(DEVICES[name].fresh(), failed_peaks=True)
    result = _search_guided(device, prior_error)
    assert result.max_batch_size == device.true_max
    _assert_answer_rule(result)


def test_a_failures_peak_pins_the_line_a_floor_leaves_flat() -> None:
    """Without a prior, the two cheap trials sit on the checkpointing floor and their line is too
    flat; the first failure above the boundary, when it reports its peak, gives the slope."""
    blind = _search_guided(DEVICES["checkpointing floor"].fresh(), None)
    device = dataclasses.replace(DEVICES["checkpointing floor"].fresh(), failed_peaks=True)
    seeing = _search_guided(device, None)
    assert [t.batch_size for t in seeing.trials] == [1, 4, 32, 512, 160, 161]
    assert len(blind.trials) > 6 and seeing.max_batch_size == blind.max_batch_size == 160
    assert seeing.memory_line is not None
    assert seeing.memory_line.per_sample_bytes == pytest.approx(1.2 * device.per_sample, rel=0.01)


def test_passes_on_a_floor_do_not_aim_at_a_failures_peak() -> None:
    """A floor just under the capacity: every pass up to the bend peaks alike. A line from such a
    pass to a failure's measured peak would land a size or two higher each time, for twenty-odd
    trials; guided bisects off the floor instead, in no more trials than doubling."""
    device = SyntheticDevice(
        "high floor",
        79 * GiB,
        fixed=int(27.5 * GiB),
        per_sample=717 * MiB,
        floor=60 * GiB,
        frag=0.29,
        max_batch_size=8192,
        failed_peaks=True,
    )
    guided = _search_guided(device.fresh(), None)
    doubling = find_max_batch(device.fresh().fits, strategy="doubling", max_batch_size=8192)
    assert guided.max_batch_size == doubling.max_batch_size == device.true_max
    assert len(guided.trials) <= len(doubling.trials), [t.batch_size for t in guided.trials]


def test_a_prior_refuted_by_a_failure_is_dropped() -> None:
    """The prior sees only the linear part; a floor alone fills the card. After a failure where the
    prior says 15 % of the card is free, guided starts over from b = 1, which fails: nothing
    fits, said in three trials instead of a bisection down from the prior's guess."""
    device = SyntheticDevice(
        "floor fills the card",
        79 * GiB,
        fixed=1 * GiB,
        per_sample=4 * MiB,
        floor=59 * GiB,
        frag=0.35,
        max_batch_size=8192,
    )
    result = _search_guided(device.fresh(), 0.0)
    assert (result.max_batch_size, result.stop_reason) == (0, "nothing_fits")
    assert len(result.trials) <= 3 and result.trials[-1].batch_size == 1


def test_a_failure_whose_peak_fits_is_not_taken_for_the_line() -> None:
    """A failure that reports a peak within the capacity (noise) must not bend the line."""
    device = DEVICES["noisy: hiccup"].fresh()

    def fits(batch_size: int) -> Trial:
        trial = device.fits(batch_size)
        if trial.ok:
            return trial
        return dataclasses.replace(trial, peak_reserved_bytes=device.capacity // 2)

    result = find_max_batch(fits, capacity_bytes=device.capacity, max_batch_size=device.max_batch_size)
    assert result.max_batch_size == device.true_max
    assert result.memory_line is not None and result.memory_line.per_sample_bytes > 0


def test_guided_with_an_exact_prior_needs_two_trials() -> None:
    device = DEVICES["gpt2-like linear"].fresh()
    result = _search_guided(device, 0.0)
    assert [(t.batch_size, t.ok) for t in result.trials] == [(52, True), (53, False)]


def test_guided_reports_the_line_fitted_to_reserved_peaks() -> None:
    device = DEVICES["gpt2-like linear"].fresh()
    result = _search_guided(device, None)
    assert result.memory_line is not None
    # Reserved = 1.05 × allocated + 64 MiB, rounded up to 2 MiB: the slope is 1.05 × per-sample.
    assert result.memory_line.per_sample_bytes == pytest.approx(1.05 * device.per_sample, rel=0.01)
    assert result.memory_line.at(result.max_batch_size) <= device.capacity


def test_doubling_reproduces_lightnings_sequence() -> None:
    device = DEVICES["gpt2-like linear"].fresh()  # true maximum 52
    result = find_max_batch(device.fits, strategy="doubling")
    assert [t.batch_size for t in result.trials] == [1, 2, 4, 8, 16, 32, 64, 48, 56, 52, 54, 53]
    assert (result.max_batch_size, result.stop_reason) == (52, "exact")


def test_backoff_reproduces_accelerates_sequence() -> None:
    device = DEVICES["small card"].fresh()  # true maximum 13
    result = find_max_batch(device.fits, strategy="backoff", max_batch_size=64)
    sizes = [64, 57, 51, 45, 40, 36, 32, 28, 25, 22, 19, 17, 15, 13]
    assert [t.batch_size for t in result.trials] == sizes
    assert (result.max_batch_size, result.stop_reason) == (13, "tolerance")


@pytest.mark.parametrize("strategy", ["guided", "doubling", "backoff"])
def test_nothing_fits_answers_zero(strategy: str) -> None:
    device = DEVICES["nothing fits"].fresh()
    result = find_max_batch(
        device.fits,
        strategy=strategy,
        capacity_bytes=device.capacity,
        max_batch_size=8,  # type: ignore[arg-type]
    )
    assert (result.max_batch_size, result.stop_reason) == (0, "nothing_fits")
    assert all(not t.ok for t in result.trials)


@pytest.mark.parametrize("strategy", ["guided", "doubling", "backoff"])
def test_everything_fits_up_to_the_limit(strategy: str) -> None:
    device = DEVICES["everything fits"].fresh()
    result = find_max_batch(
        device.fits,
        strategy=strategy,
        capacity_bytes=device.capacity,
        max_batch_size=1000,  # type: ignore[arg-type]
    )
    assert (result.max_batch_size, result.stop_reason) == (1000, "max_batch_size")


def test_guided_without_capacity_brackets_by_doubling() -> None:
    device = DEVICES["gpt2-like linear"].fresh()
    result = find_max_batch(device.fits, prior=device.prior(), capacity_bytes=None)
    assert [t.batch_size for t in result.trials][:7] == [1, 2, 4, 8, 16, 32, 64]
    assert (result.max_batch_size, result.stop_reason) == (52, "exact")


def test_guided_without_peaks_still_finds_the_maximum() -> None:
    """A step function that reports no bytes (a user's own step) leaves only pass/fail."""
    device = DEVICES["llama-1b-like linear"].fresh()

    def fits(batch_size: int) -> Trial:
        trial = device.fits(batch_size)
        return Trial(batch_size=batch_size, ok=trial.ok)

    result = find_max_batch(fits, capacity_bytes=device.capacity)
    assert (result.max_batch_size, result.stop_reason) == (device.true_max, "exact")
    assert result.memory_line is None


def test_tolerance_stops_with_a_bracket_that_narrow() -> None:
    device = DEVICES["gpt2-like linear"].fresh()
    result = find_max_batch(device.fits, strategy="doubling", tolerance=4)
    assert result.stop_reason == "tolerance"
    assert 52 - 4 <= result.max_batch_size <= 52
    assert len(result.trials) < 12


def test_trial_budget_stops_with_the_best_pass_so_far() -> None:
    device = DEVICES["gpt2-like linear"].fresh()
    result = find_max_batch(device.fits, strategy="doubling", max_trials=5)
    assert (result.max_batch_size, result.stop_reason, len(result.trials)) == (16, "max_trials", 5)


def test_on_trial_sees_every_trial_in_order() -> None:
    device = DEVICES["high fragmentation"].fresh()
    seen: list[Trial] = []
    result = find_max_batch(device.fits, capacity_bytes=device.capacity, on_trial=seen.append)
    assert seen == result.trials


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "random"}, "Unknown search strategy"),
        ({"min_batch_size": 0}, "min_batch_size"),
        ({"min_batch_size": 8, "max_batch_size": 4}, "below min_batch_size"),
        ({"max_trials": 0}, "max_trials"),
        ({"tolerance": -1}, "tolerance"),
        ({"capacity_bytes": 0}, "capacity_bytes"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        find_max_batch(lambda b: Trial(batch_size=b, ok=True), **kwargs)  # type: ignore[arg-type]


def test_a_trial_for_the_wrong_size_is_an_error() -> None:
    with pytest.raises(ProbeError, match="reported batch size 3"):
        find_max_batch(lambda b: Trial(batch_size=3, ok=True), strategy="doubling")


@settings(max_examples=60, deadline=None)
@given(
    fixed_gib=st.floats(0.1, 30),
    per_sample_mib=st.floats(1, 4000),
    frag=st.floats(0.0, 0.35),
    prior_error=st.one_of(st.none(), st.floats(-0.1, 0.1)),
)
def test_guided_and_doubling_agree_on_random_linear_devices(
    fixed_gib: float, per_sample_mib: float, frag: float, prior_error: float | None
) -> None:
    device = SyntheticDevice(
        "random",
        79 * GiB,
        fixed=int(fixed_gib * GiB),
        per_sample=int(per_sample_mib * MiB),
        frag=frag,
        max_batch_size=8192,
    )
    guided = _search_guided(device.fresh(), prior_error)
    doubling = find_max_batch(device.fresh().fits, strategy="doubling", max_batch_size=8192)
    assert guided.max_batch_size == doubling.max_batch_size == device.true_max
    assert len(guided.trials) <= len(doubling.trials) + 2


@settings(max_examples=150, deadline=None)
@given(
    fixed_gib=st.floats(0.1, 30),
    per_sample_mib=st.floats(1, 4000),
    floor_gib=st.floats(0, 60),
    frag=st.floats(0.0, 0.35),
    prior_error=st.one_of(st.none(), st.floats(-0.1, 0.1)),
    failed_peaks=st.booleans(),
)
def test_guided_is_exact_on_random_devices_with_a_floor(
    fixed_gib: float,
    per_sample_mib: float,
    floor_gib: float,
    frag: float,
    prior_error: float | None,
    failed_peaks: bool,
) -> None:
    """Memory flat up to a floor (checkpointing) and linear after it, failures with or without
    their peaks (estimate or GPU), priors that cannot see the floor: guided still lands on the
    exact maximum, and never needs more than two trials beyond doubling's count (a line from the
    floor across the bend can cost those where the bend sits right under the capacity)."""
    device = SyntheticDevice(
        "random floor",
        79 * GiB,
        fixed=int(fixed_gib * GiB),
        per_sample=int(per_sample_mib * MiB),
        floor=int(floor_gib * GiB),
        frag=frag,
        max_batch_size=8192,
        failed_peaks=failed_peaks,
    )
    guided = _search_guided(device.fresh(), prior_error)
    doubling = find_max_batch(device.fresh().fits, strategy="doubling", max_batch_size=8192)
    assert guided.max_batch_size == device.true_max
    _assert_answer_rule(guided)
    assert len(guided.trials) <= len(doubling.trials) + 2, [t.batch_size for t in guided.trials]


def test_every_guided_trial_says_why_it_ran() -> None:
    # An exact prior: its prediction passes, the size above confirms the top by failing.
    exact = _search_guided(DEVICES["gpt2-like linear"].fresh(), 0.0)
    assert [(t.batch_size, t.move) for t in exact.trials] == [(52, Move.PREDICT), (53, Move.ABOVE)]
    # No capacity to predict with: the first cheap trial, doubling, then bisecting the bracket.
    blind = find_max_batch(DEVICES["gpt2-like linear"].fresh().fits, capacity_bytes=None)
    moves = [t.move for t in blind.trials]
    assert moves[:7] == [Move.FIRST, *[Move.GROW] * 6] and set(moves[7:]) == {Move.BISECT}
    # Without a prior: two cheap trials pin the line, which then predicts.
    line = _search_guided(DEVICES["gpt2-like linear"].fresh(), None)
    assert [t.move for t in line.trials][:3] == [Move.FIRST, Move.SECOND, Move.PREDICT]
    # Every guided trial on every device has its move; the other strategies record none.
    for name in DEVICES:
        for prior_error in (None, 0.1):
            result = _search_guided(DEVICES[name].fresh(), prior_error)
            assert all(isinstance(t.move, Move) for t in result.trials), name
    doubling = find_max_batch(DEVICES["gpt2-like linear"].fresh().fits, strategy="doubling")
    assert {t.move for t in doubling.trials} == {None}


def test_a_refuted_prior_starts_over_from_the_first_cheap_trial() -> None:
    """The prior is dropped between trials (not while a size is proposed): after the failure
    where it said 15 % of the card is free, the next move is the first cheap trial."""
    device = SyntheticDevice(
        "floor fills the card",
        79 * GiB,
        fixed=1 * GiB,
        per_sample=4 * MiB,
        floor=59 * GiB,
        frag=0.35,
        max_batch_size=8192,
    )
    result = _search_guided(device.fresh(), 0.0)
    assert result.trials[0].move is Move.PREDICT and not result.trials[0].ok
    assert result.trials[1].move is Move.FIRST and result.trials[1].batch_size == 1
