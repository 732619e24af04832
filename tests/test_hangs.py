"""Hang detection as a pure function of the ranks' views and the time (controller/hangs.py)."""

from __future__ import annotations

from orchestrator.controller import hangs
from orchestrator.controller.views import Move, Phase, RankView

LIMITS = hangs.Limits(hang_timeout_s=5.0, stuck_timeout_s=60.0, heartbeat_s=1.0)


def _training(progress_at: float, alive_at: float, in_collective: bool, where: str = "") -> RankView:
    view = RankView(progress_at=progress_at, alive_at=alive_at, in_collective=in_collective, where=where)
    view.advance(Move.STEPPED)
    return view


def test_the_rank_the_others_wait_for_is_the_culprit_and_says_where_it_is() -> None:
    views = {0: _training(0.0, 9.5, in_collective=True), 1: _training(0.5, 9.5, False, where="train.py:9 in load")}
    assert hangs.culprits(views, 5.3, LIMITS) == [], "only the waiting rank is stale yet"
    assert hangs.culprits(views, 10.0, LIMITS) == [1]
    assert hangs.why(views[1], 10.0, LIMITS) == "no step for 9.5s (limit 5s); main thread at train.py:9 in load"


def test_a_frozen_rank_is_a_culprit_even_in_a_collective_and_all_waiting_ranks_are_suspect() -> None:
    views = {0: _training(0.0, 9.5, in_collective=True), 1: _training(0.0, 5.0, in_collective=True)}
    assert hangs.culprits(views, 10.0, LIMITS) == [1] and "no sign of life for 5.0s" in hangs.why(views[1], 10.0, LIMITS)
    views[1].alive_at = 9.5
    assert hangs.culprits(views, 10.0, LIMITS) == [0, 1], "every rank waits and nothing failed: all suspect"
    views[1].advance(Move.FAILED)
    assert views[1].phase is Phase.FAILED and hangs.culprits(views, 10.0, LIMITS) == [], \
        "a failed rank is what the others wait for"


def test_before_its_first_step_a_rank_is_stuck_only_past_the_stuck_limit_its_stack_still() -> None:
    starting = RankView(progress_at=0.0, alive_at=99.5, moved_at=30.0, where="train.py:9 in load")
    views = {0: starting}
    assert hangs.culprits(views, 89.0, LIMITS) == [], "59 s still: under stuck_timeout_s"
    assert hangs.culprits(views, 91.0, LIMITS) == [0]
    assert hangs.why(starting, 91.0, LIMITS).startswith("its main thread has been blocked for 61.0s")
    assert hangs.idle_s(starting, 91.0) == 61.0 and LIMITS.of(starting) == 60.0


def test_only_the_candidates_are_looked_at_but_every_rank_waiting_needs_every_rank() -> None:
    """The controller passes the ranks of nodes not heard from within hang_timeout_s as candidates."""
    views = {0: _training(0.0, 9.5, in_collective=False), 1: _training(0.0, 9.5, in_collective=False)}
    assert hangs.culprits(views, 10.0, LIMITS, candidates=[1]) == [1], "rank 0 is not looked at"
    views[1].in_collective = True
    views[2] = _training(9.0, 9.5, in_collective=True)
    views[2].advance(Move.LEFT)  # not watched: it left training (waits for a rejoin)
    assert hangs.culprits(views, 10.0, LIMITS, candidates=[1]) == [0], \
        "the candidate waits, and no culprit is among the candidates: every rank is looked at"
    views[0].in_collective = True
    assert hangs.culprits(views, 10.0, LIMITS, candidates=[0, 1]) == [0, 1] == hangs.culprits(views, 10.0, LIMITS), \
        "every watched rank waits: all suspect"
