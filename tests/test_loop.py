"""The wall-time budget (`loop.WallClock`): what it keeps back for the final evaluation."""

from __future__ import annotations

import pytest

from scannet_jax import loop


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(loop.time, "time", lambda: now[0])
    wall = loop.WallClock(limit_s=7800.0, final_structures=130_000)
    return wall, now


def guess(speed: float) -> float:
    return loop.FINAL_EVAL_MARGIN * 130_000 / (loop.FORWARD_FRACTION_OF_STEP * speed) + loop.FINAL_EVAL_OVERHEAD_S


def test_the_first_interval_is_ignored_and_the_fastest_later_one_is_used(clock):
    wall, _ = clock
    wall.train_speed(5.0)  # compiling
    assert wall.final_eval_s == 0.0
    wall.train_speed(300.0)
    wall.train_speed(120.0)  # a later bucket compiling, or a busy machine: slower, not used
    assert wall.final_eval_s == pytest.approx(guess(300.0))


def test_a_slow_guess_keeps_back_at_most_half_the_budget(clock):
    """A 130-minute QM9 run at 44 molecules/s was stopped in its first epoch by a guessed
    final evaluation of 3 hours; the guess is capped until an evaluation is timed."""
    wall, now = clock
    wall.train_speed(40.0)
    wall.train_speed(44.0)
    assert guess(44.0) > 7800.0
    assert wall.final_eval_s == pytest.approx(0.5 * 7800.0)
    now[0] += 3000.0
    assert not wall.out_of_time()
    now[0] += 1000.0
    assert wall.out_of_time()


def test_a_measured_evaluation_speed_replaces_the_guess(clock):
    wall, now = clock
    wall.train_speed(40.0)
    wall.train_speed(44.0)
    wall.eval_speed(200.0)
    expected = loop.FINAL_EVAL_MARGIN * 130_000 / 200.0 + loop.FINAL_EVAL_OVERHEAD_S
    assert wall.final_eval_s == pytest.approx(expected)
    wall.train_speed(10.0)
    assert wall.final_eval_s == pytest.approx(expected)  # measured: guesses no longer apply
    now[0] += 7800.0 - expected - 1.0
    assert not wall.out_of_time()
    now[0] += 2.0
    assert wall.out_of_time()


def test_no_budget_never_runs_out(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(loop.time, "time", lambda: now[0])
    wall = loop.WallClock(limit_s=0.0, final_structures=10)
    wall.train_speed(1.0)
    wall.train_speed(1.0)
    now[0] += 1e9
    assert not wall.out_of_time()
