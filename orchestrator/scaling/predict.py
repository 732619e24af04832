"""Fit a finished sweep and predict its target (``orchestrator scaling fit``).

Reads every run's held-out losses from its event log, fits ``L(C) = a*C^b + c`` to the final ones
and, when the runs evaluated along the way (``evaluation.interval_steps``), ``L(N, D)`` to all of
them; a bootstrap over runs gives each prediction an interval, and a backtest (the law without the
largest run, asked for it) flags a sweep whose trend does not hold even within its own span. Writes
the prediction as JSON (what ``orchestrator launch --prediction`` reads to watch the target) and a
plot.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Config
from orchestrator.errors import ConfigError
from orchestrator.events import Step, read_typed
from orchestrator.scaling import law
from orchestrator.scaling.plan import Plan, PlannedRun, flops_per_token, non_embedding_params, tokens_per_step
from orchestrator.scaling.sweep import status, sweep_dir

PREDICTION_VERSION = 2  # 2: `evaluation`, the held-out settings a launch must match
LEVEL = 0.9  # the bootstrap interval's coverage
TRAJECTORY_POINTS = 40  # predicted held-out loss along the target's training, for watching it


def points_of(plan: Plan, plan_path: Path, run: PlannedRun) -> list[law.Point]:
    """Every held-out loss ``run`` reported (the last report of each step: a resumed run repeats some)."""
    config = plan.run_config(run)
    step_tokens, per_token = tokens_per_step(config), flops_per_token(config.model, plan.compute)
    path = sweep_dir(plan_path) / run.name / "events.jsonl"
    by_step = {e.step: e.heldout_loss for e in (read_typed(path) if path.exists() else [])
               if isinstance(e, Step) and e.heldout_loss is not None}
    return [law.Point(run=run.name, params=run.params, tokens=step * step_tokens, compute=per_token * step * step_tokens,
                      loss=loss) for step, loss in sorted(by_step.items())]


def predict(plan: Plan, plan_path: Path, *, exclude: tuple[str, ...] = (), samples: int = 200) -> dict[str, Any]:
    """The prediction document: fits, the target's predicted final held-out loss with its interval,
    the predicted trajectory, the points used and, when the target has run, its actual loss."""
    unknown = set(exclude) - {r.name for r in plan.runs}
    if unknown:
        raise ConfigError(f"--exclude {', '.join(sorted(unknown))}: not a run of this plan "
                          f"({', '.join(r.name for r in plan.runs)})")
    runs = [r for r in plan.runs if r.name not in exclude]
    unfinished = [r.name for r in runs if not status(plan, plan_path, r).done]
    if unfinished:
        raise ConfigError(f"runs not finished: {', '.join(unfinished)}; run `orchestrator scaling run {plan_path}` "
                          f"(it resumes them), or leave them out with --exclude")
    every = [p for r in runs for p in points_of(plan, plan_path, r)]
    finals = [max((p for p in every if p.run == r.name), key=lambda p: p.tokens) for r in runs
              if any(p.run == r.name for p in every)]
    target = plan.target
    compute_law = law.fit_compute_law(finals)
    refits = law.bootstrap_fits(finals, functools.partial(law.fit_compute_law, start=compute_law), samples=samples)
    low, high = law.interval([float(f(target.compute_flops)) for f in refits], LEVEL)
    doc: dict[str, Any] = {
        "version": PREDICTION_VERSION,
        "plan": str(plan_path.resolve()),
        "compute": plan.compute,
        "target": {"params": target.params, "tokens": target.tokens, "compute_flops": target.compute_flops},
        "evaluation": heldout_settings(plan.run_config(target)),
        "level": LEVEL,
        "compute_law": {**compute_law.as_dict(), "final_loss": float(compute_law(target.compute_flops)),
                        "interval": [low, high]},
        "size_data_law": None,
        "trajectory": [],
        "points": [vars(p) for p in every],
        "excluded": list(exclude),
    }
    doc["prediction"] = {"law": "compute", "final_loss": doc["compute_law"]["final_loss"], "interval": [low, high]}
    try:
        doc["backtest"] = law.backtest_compute_law(finals).as_dict()
    except ConfigError as exc:  # the runs but the largest cannot be fitted: that says enough
        doc["backtest"] = {"error": str(exc), "passed": False}
    if len({p.tokens for p in every}) > len(finals):  # intermediate evaluations: D varies for each N
        try:
            doc["size_data_law"], doc["trajectory"] = _size_data(plan, every, samples)
        except ConfigError as exc:
            doc["size_data_law"] = {"error": str(exc)}
    actual = target_result(plan, plan_path)
    if actual is not None:
        doc["actual"] = actual
    return doc


def _size_data(plan: Plan, points: list[law.Point], samples: int) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """L(N, D) fitted to every point, its prediction for the target and the target's trajectory."""
    target = plan.target
    fitted = law.fit_size_data_law(points)
    steps = plan.run_config(target).train.steps
    step_tokens = target.tokens // steps
    marks = sorted({max(1, round(steps * (i + 1) / TRAJECTORY_POINTS)) for i in range(TRAJECTORY_POINTS)})
    refits = law.bootstrap_fits(points, functools.partial(law.fit_size_data_law, start=fitted), samples=samples)
    trajectory = []
    for step in marks:
        tokens = step * step_tokens
        lo, hi = law.interval([float(f(target.params, tokens)) for f in refits], LEVEL)
        trajectory.append({"step": step, "tokens": tokens, "loss": float(fitted(target.params, tokens)),
                           "low": float(lo), "high": float(hi)})
    final = trajectory[-1]
    return {**fitted.as_dict(), "final_loss": final["loss"], "interval": [final["low"], final["high"]]}, trajectory


def target_result(plan: Plan, plan_path: Path) -> dict[str, float] | None:
    """The target's actual final held-out loss, once it has run (in the sweep directory)."""
    s = status(plan, plan_path, plan.target)
    if not s.done or s.heldout_loss is None:
        return None
    return {"final_loss": s.heldout_loss}


def write(doc: dict[str, Any], out: Path) -> None:
    """The prediction as JSON at ``out``."""
    out.write_text(json.dumps(doc, indent=2) + "\n")


def load(path: Path) -> dict[str, Any]:
    """A prediction written by ``orchestrator scaling fit``."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the prediction ({exc.strerror})") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(doc, dict) or "prediction" not in doc:
        raise ConfigError(f"{path}: not a prediction written by `orchestrator scaling fit`")
    if doc.get("version") != PREDICTION_VERSION:
        raise ConfigError(f"{path}: prediction version {doc.get('version')!r}, this orchestrator reads "
                          f"{PREDICTION_VERSION}; write it again with `orchestrator scaling fit PLAN`")
    return doc


def heldout_settings(config: Config) -> dict[str, int]:
    """What makes two held-out losses the same measure: the held-out bytes and the windows evaluated."""
    return {"heldout_bytes": config.evaluation.heldout_bytes, "batches": config.evaluation.batches}


def for_run(path: Path, config: Config) -> dict[str, Any]:
    """The prediction at ``path`` for a launch of ``config`` (``orchestrator launch --prediction``):
    refused when it was made for another model size or token count, or another held-out set."""
    doc = load(path)
    if not config.train.is_builtin:
        raise ConfigError(f"--prediction {path}: watching a prediction needs the built-in workload "
                          f"(train.entrypoint, train.script and train.module unset), as the plan's runs have")
    evaluates = heldout_settings(config)
    if evaluates != doc["evaluation"]:
        sets = " ".join(f"--set evaluation.{k}={v}" for k, v in doc["evaluation"].items())
        raise ConfigError(f"--prediction {path}: the sweep's held-out losses were measured with {doc['evaluation']}, "
                          f"this config evaluates with {evaluates}; add {sets} (or launch the target with "
                          f"`orchestrator scaling run {doc['plan']} --target`)")
    params = non_embedding_params(config.model)
    tokens = config.train.steps * tokens_per_step(config)
    target = doc["target"]
    if (params, tokens) != (target["params"], target["tokens"]):
        raise ConfigError(f"--prediction {path}: made for N={target['params']:,} parameters and D={target['tokens']:,} "
                          f"tokens; this config has N={params:,}, D={tokens:,}: launch the plan's target "
                          f"(its config and --set items are in {doc['plan']})")
    return doc


def predicted_at(doc: dict[str, Any], step: int) -> tuple[float, float, float] | None:
    """(loss, low, high) predicted for the target's held-out loss at ``step``, interpolated linearly
    between the trajectory's steps; None without a trajectory (no L(N, D) fit) or before its first step."""
    trajectory = doc.get("trajectory") or []
    if not trajectory or step < trajectory[0]["step"]:
        return None
    for before, after in zip(trajectory, trajectory[1:]):
        if before["step"] <= step <= after["step"]:
            w = (step - before["step"]) / (after["step"] - before["step"])
            return tuple(before[k] + w * (after[k] - before[k]) for k in ("loss", "low", "high"))  # type: ignore[return-value]
    last = trajectory[-1]
    return last["loss"], last["low"], last["high"]
