"""The sweep through the launcher and the fit of its event logs: `orchestrator scaling run` stops its
launches on Ctrl-C, resumes an interrupted run from its checkpoint and skips finished ones;
`orchestrator scaling fit` reads the runs' held-out losses and writes the prediction and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import events as ev
from orchestrator.config.loader import load_config
from orchestrator.events import EventLog
from orchestrator.scaling import law
from orchestrator.scaling.plan import Plan, PlannedRun, flops_per_token, non_embedding_params, tokens_per_step
from orchestrator.scaling.predict import points_of
from orchestrator.scaling.sweep import sweep_dir
from tests.helpers import (
    LOCAL_CONFIG,
    cli,
    descendants,
    events,
    interrupt,
    of_kind,
    start_cli,
    wait_for_event,
    wait_gone,
)

# One rank per run, so that two runs share the machine's two cores; evaluation along the way for L(N, D).
SETS = ["evaluation.heldout_bytes=65536", "evaluation.batches=8", "evaluation.interval_steps=10",
        "cluster.workers_per_node=1", "checkpoint.interval_steps=10", "metrics.enabled=false"]
TARGET = (4, 128, 4, 400)


def _plan(path: Path, shapes: list[tuple[int, int, int, int]]) -> Plan:
    """A plan of runs of ``shapes`` ((layers, dim, heads, steps) each) for the local config."""

    def run(name: str, layers: int, dim: int, heads: int, steps: int) -> PlannedRun:
        overrides = {"model.layers": layers, "model.dim": dim, "model.heads": heads, "train.steps": steps}
        config = load_config(str(LOCAL_CONFIG), [*SETS, *(f"{k}={v}" for k, v in overrides.items())])
        tokens = steps * tokens_per_step(config)
        return PlannedRun(name=name, overrides=overrides, params=non_embedding_params(config.model), tokens=tokens,
                          compute_flops=flops_per_token(config.model, "6ND") * tokens)

    plan = Plan(config=str(LOCAL_CONFIG), set=SETS, compute="6ND", sweep_compute_fraction=0.01,
                target=run("target", *TARGET), runs=[run(f"run{i + 1:02d}", *s) for i, s in enumerate(shapes)])
    path.write_text(plan.to_json())
    return plan


@pytest.mark.processes
@pytest.mark.timeout(600)
def test_a_sweep_stops_on_ctrl_c_resumes_its_interrupted_run_and_skips_finished_ones(tmp_path: Path) -> None:
    plan_path = tmp_path / "sweep.json"
    # The first run is long enough (for its size) to be interrupted between its checkpoints.
    plan = _plan(plan_path, [(1, 32, 1, 100), (2, 32, 1, 20)])
    interrupted = sweep_dir(plan_path) / "run01"

    # Ctrl-C once the first run has committed a checkpoint: the sweep stops its launch, which keeps
    # its checkpoints, and leaves nothing running.
    sweep = start_cli("scaling", "run", str(plan_path), "--parallel", "1")
    try:
        wait_for_event(interrupted, lambda e: e["event"] == "checkpoint_committed", timeout=180, proc=sweep)
        started = descendants(sweep.pid)
        interrupt(sweep)
        output, _ = sweep.communicate(timeout=90)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait(timeout=10)
    assert sweep.returncode == 130, output
    assert "again to resume" in output and "Traceback" not in output, output
    assert wait_gone(started) == [], "a launch of the interrupted sweep outlived it"
    finished = of_kind(events(interrupted), "run_finished")
    assert not finished or finished[-1]["status"] != "succeeded", "interrupted too late: the run had finished"

    # Again: the interrupted run resumes from its checkpoint and the other runs beside it.
    result = cli("scaling", "run", str(plan_path), "--parallel", "2", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run01: resuming" in result.stderr and "run02: starting" in result.stderr, result.stderr
    assert of_kind(events(interrupted), "run_started")[-1]["resumed_from_step"] >= 10
    for run in plan.runs:
        [finished] = [e for e in of_kind(events(sweep_dir(plan_path) / run.name), "run_finished")
                      if e["status"] == "succeeded"]
        assert finished["step"] == run.overrides["train.steps"] and finished["heldout_loss"] > 0, finished
        # One rank on the node's two cores: still forked from the zygote, which imports single-threaded.
        assert all(w["forked"] for w in of_kind(events(sweep_dir(plan_path) / run.name), "worker_started"))
        # What the fit reads: a held-out loss every 10 steps, the last one the final one.
        points = points_of(plan, plan_path, run)
        assert [p.tokens for p in points] == [s * 1024 for s in range(10, run.overrides["train.steps"] + 1, 10)]
        assert points[-1].loss == finished["heldout_loss"]

    again = cli("scaling", "run", str(plan_path), timeout=60)
    assert again.returncode == 0 and again.stderr.count("skipped") == len(plan.runs), again.stderr


SHAPES = [(1, 32, 1, 20), (2, 32, 1, 30), (1, 64, 2, 40), (2, 64, 2, 60), (3, 64, 2, 80), (3, 96, 3, 100)]
TRUE_LAW = law.ComputeLaw(a=30.0, b=-0.12, c=1.0)


def _finished_runs(plan: Plan, plan_path: Path, largest_off: float = 1.0) -> None:
    """Event logs of finished runs whose held-out losses follow ``TRUE_LAW`` (with a little noise),
    the largest sweep run's scaled by ``largest_off``, and of the finished target."""
    for i, run in enumerate([*plan.runs, plan.target]):
        steps = run.overrides["train.steps"]
        noise = 1 + 0.003 * (-1) ** i if run is not plan.target else 1.0
        (sweep_dir(plan_path) / run.name).mkdir(parents=True)
        log = EventLog(sweep_dir(plan_path) / run.name / "events.jsonl")
        heldout = float(TRUE_LAW(run.compute_flops)) * noise * (largest_off if run is plan.runs[-1] else 1.0)
        log.emit(ev.Step(step=steps, loss=9.9, step_time_s=1.0, tokens_per_s=None, heldout_loss=heldout))
        log.emit(ev.RunFinished(status="succeeded", step=steps, final_loss=9.9, heldout_loss=heldout, restarts=0,
                                restarts_by_reason={}, failures_by_reason={}))
        log.close()


def test_fit_reads_the_event_logs_and_writes_the_prediction_and_the_plot(tmp_path: Path) -> None:
    """Runs whose event logs follow a known law L(C): the fit recovers the target's loss from them,
    passes its backtest, and reports the target's actual result once its run has finished."""
    plan_path = tmp_path / "sweep.json"
    plan = _plan(plan_path, SHAPES)
    _finished_runs(plan, plan_path)

    fit = cli("scaling", "fit", str(plan_path), "--bootstrap", "60", timeout=120)
    assert fit.returncode == 0, fit.stdout + fit.stderr
    doc = json.loads((tmp_path / "sweep-prediction.json").read_text())
    truth = float(TRUE_LAW(plan.target.compute_flops))
    assert doc["prediction"]["final_loss"] == pytest.approx(truth, rel=0.01)
    assert doc["actual"]["final_loss"] == pytest.approx(truth)
    assert [p["run"] for p in doc["points"]] == [r.name for r in plan.runs]
    assert "target actual" in fit.stdout and "inside the interval" in fit.stdout, fit.stdout
    assert doc["backtest"]["run"] == "run06" and doc["backtest"]["passed"], doc["backtest"]
    assert "backtest: L(C) without run06" in fit.stdout and "warning" not in fit.stderr, fit.stdout + fit.stderr
    assert (tmp_path / "sweep-prediction.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_warns_when_the_sweep_misses_its_own_largest_run(tmp_path: Path) -> None:
    """A largest run 5% below the others' law (a sweep still bending, as small models on this
    machine's corpus do): the fit still writes its prediction, flags the failed backtest in the
    JSON and warns on stderr that the target lies far beyond a trend that does not hold."""
    plan_path = tmp_path / "sweep.json"
    plan = _plan(plan_path, SHAPES)
    _finished_runs(plan, plan_path, largest_off=0.95)

    fit = cli("scaling", "fit", str(plan_path), "--bootstrap", "60", timeout=120)
    assert fit.returncode == 0, fit.stdout + fit.stderr
    backtest = json.loads((tmp_path / "sweep-prediction.json").read_text())["backtest"]
    assert not backtest["passed"] and backtest["relative_error"] > law.BACKTEST_TOLERANCE, backtest
    assert "falling faster than its own law" in fit.stderr and "do not trust the prediction" in fit.stderr, fit.stderr
