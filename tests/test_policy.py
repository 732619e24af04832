"""The failure policy as a pure function."""

from __future__ import annotations

from orchestrator.controller.failures import Failure, failure_from
from orchestrator.controller.policy import Attempt, FailurePolicy
from orchestrator.controller.worker_group import RankUpdate


def failure(reason: str = "signal", **kw) -> Failure:
    return Failure(rank=kw.pop("rank", 1), reason=reason, at=0.0, message=kw.pop("message", "x"), **kw)


def test_first_failure_retries_in_place_at_once() -> None:
    decision = FailurePolicy(max_restarts=3).decide(failure(), [])
    assert decision.retry and decision.mode == "in_place" and decision.delay_s == 0
    assert "2 restarts left" in decision.reason


def test_budget() -> None:
    history = [Attempt(cause=failure(), mode="in_place", progressed=True)] * 3
    decision = FailurePolicy(max_restarts=3).decide(failure(), history)
    assert not decision.retry and "budget spent" in decision.reason
    assert not FailurePolicy(max_restarts=0).decide(failure(), []).retry


def test_config_error_is_never_retried() -> None:
    cause = failure("exception", exc_type="ConfigError", message="ConfigError: train.entrypoint: ...")
    decision = FailurePolicy(max_restarts=3).decide(cause, [])
    assert not decision.retry and "config error" in decision.reason


def test_same_exception_same_step_is_a_bug() -> None:
    first = failure("exception", exc_type="ValueError", message="ValueError: nan", step=7)
    again = failure("exception", exc_type="ValueError", message="ValueError: nan", step=7, rank=0)
    history = [Attempt(cause=first, mode="in_place", progressed=False)]
    assert not FailurePolicy(max_restarts=9).decide(again, history).retry


def test_same_exception_at_another_step_is_retried() -> None:
    first = failure("exception", exc_type="OSError", message="OSError: stale handle", step=7)
    later = failure("exception", exc_type="OSError", message="OSError: stale handle", step=90)
    history = [Attempt(cause=first, mode="in_place", progressed=True)]
    assert FailurePolicy(max_restarts=9).decide(later, history).retry


def test_failed_in_place_recovery_falls_back_to_full_restart_with_backoff() -> None:
    history = [Attempt(cause=failure(), mode="in_place", progressed=False)]
    decision = FailurePolicy(max_restarts=5).decide(failure(), history)
    assert decision.retry and decision.mode == "full_restart" and decision.delay_s == 1.0
    history.append(Attempt(cause=failure(), mode="full_restart", progressed=False))
    assert FailurePolicy(max_restarts=5).decide(failure(), history).delay_s == 2.0


def test_progress_resets_backoff() -> None:
    history = [Attempt(cause=failure(), mode="in_place", progressed=False),
               Attempt(cause=failure(), mode="full_restart", progressed=True)]
    decision = FailurePolicy(max_restarts=5).decide(failure(), history)
    assert decision.delay_s == 0 and decision.mode == "in_place"


def test_node_lost_is_recovered_in_place_unless_configured_otherwise() -> None:
    assert FailurePolicy(max_restarts=3).decide(failure("node_lost"), []).mode == "in_place"
    assert FailurePolicy(max_restarts=3, prefer="full_restart").decide(failure(), []).mode == "full_restart"


def test_a_failed_ranks_log_tail_shows_no_noise_of_a_healthy_start() -> None:
    """DeepSpeed's "built successfully" (a prebuilt op loaded) and library deprecation warnings, with
    the source line they quote, stay in the rank's log but out of the tail the user is shown."""
    log = ("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully\n"
           "/venv/torch/distributed/c10d.py:80: FutureWarning: `torch.x` is deprecated\n"
           "  warnings.warn(\n"
           "step 3 loss 1.2\n"
           "killed by the OOM killer? see dmesg\n")
    failure = Failure(rank=1, reason="signal", at=0.0, message="killed", log_tail=log)
    assert failure.details() == "step 3 loss 1.2\nkilled by the OOM killer? see dmesg\n"
    assert failure.event_fields()["log_tail"] == "step 3 loss 1.2\nkilled by the OOM killer? see dmesg"


def test_a_rank_the_oom_killer_took_is_named_so_and_the_same_overload_is_not_retried() -> None:
    """SIGKILL while the kernel's OOM killer was at work (its agent saw the node's count rise) is ``oom``
    with the node's memory, not a bare ``signal``; out of memory again after recovering from it ends
    the run instead of meeting the same wall on every restart."""
    update = RankUpdate(rank=3, returncode=-9, exited_at=5.0, oom="its node has 23.5 GiB of memory (0.2 GiB available)")
    oom = failure_from(update, None, last_step=7)
    assert oom is not None and (oom.reason, oom.signal, oom.step) == ("oom", 9, 7)
    assert oom.message == ("training process killed by the kernel's OOM killer (its node has 23.5 GiB of memory "
                           "(0.2 GiB available))")
    killed = failure_from(RankUpdate(rank=3, returncode=-9, exited_at=5.0), None, last_step=7)
    assert killed is not None and killed.reason == "signal"
    policy = FailurePolicy(max_restarts=5)
    assert policy.decide(oom, []).retry
    again = policy.decide(oom, [Attempt(cause=oom, mode="in_place", progressed=True)])
    assert not again.retry and again.reason.startswith("not retryable: out of memory again")
    assert policy.decide(oom, [Attempt(cause=failure("node_lost"), mode="in_place", progressed=True)]).retry
