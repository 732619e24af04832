"""Metrics end to end: a real Prometheus scrapes a running local job; the shipped files check out.

Needs Debian's ``prometheus`` package (``bash .ci/setup`` installs it where
apt-get can run as root); without it these tests skip and say so.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import events as ev
from orchestrator.monitor.goodput import GoodputTracker
from orchestrator.monitor.metrics import JobMetrics, RankSample
from tests.helpers import (
    REPO,
    cli,
    events,
    launch_args,
    of_kind,
    start_cli,
    wait_for_event,
)
from tests.prometheus import PROMTOOL, Prometheus, needs_prometheus, run_scrape_config

ASSETS = REPO / "orchestrator" / "monitor" / "assets"


def _prediction_for(overrides: list[str], path: Path) -> Path:
    """A prediction document (as `orchestrator scaling fit` writes) made for the local config with
    ``overrides``: a trajectory from 3.5 at step 1 down to 2.0 at the last, ±0.1; a final-loss
    interval around 2.0."""
    from orchestrator.config.loader import load_config
    from orchestrator.scaling.plan import non_embedding_params, tokens_per_step

    config = load_config(REPO / "cluster_configs" / "local.yaml", overrides)
    steps = config.train.steps
    trajectory = [{"step": s, "tokens": s * tokens_per_step(config), "loss": loss, "low": loss - 0.1, "high": loss + 0.1}
                  for s, loss in ((1, 3.5), (steps, 2.0))]
    doc = {"version": 2, "plan": "plan.json", "compute": "6ND", "level": 0.9,
           "target": {"params": non_embedding_params(config.model), "tokens": steps * tokens_per_step(config),
                      "compute_flops": 1e15},
           "evaluation": {"heldout_bytes": config.evaluation.heldout_bytes, "batches": config.evaluation.batches},
           "prediction": {"law": "compute", "final_loss": 2.0, "interval": [1.9, 2.1]}, "trajectory": trajectory}
    path.write_text(json.dumps(doc))
    return path


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads((ASSETS / "grafana-dashboard.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]


def _rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((ASSETS / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


@needs_prometheus
def test_promtool_accepts_the_shipped_rules_and_config() -> None:
    for args in (["check", "rules", str(ASSETS / "alerts.yml")], ["check", "config", str(ASSETS / "prometheus.yml")]):
        result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_prometheus
@pytest.mark.processes
@pytest.mark.timeout(600)
def test_prometheus_scrapes_a_running_job_and_every_shipped_expression_evaluates(tmp_path: Path) -> None:
    """With simulated GPUs, so every panel of the job dashboard, GPU panels included, has data."""
    run_dir = tmp_path / "run"
    overrides = ["train.steps=5000", "checkpoint.interval_steps=20", "evaluation.heldout_bytes=262144",
                 "evaluation.interval_steps=5", "metrics.simulated_gpus=true"]
    prediction = _prediction_for(overrides, tmp_path / "prediction.json")
    job = start_cli(*launch_args(run_dir, *overrides), "--prediction", str(prediction))
    try:
        started = wait_for_event(run_dir, lambda e: e["event"] == "metrics_started", 60, job)
        assert started["url"] in cli("metrics", str(run_dir)).stdout
        with Prometheus(tmp_path, run_scrape_config(run_dir), [ASSETS / "alerts.yml"]) as prom:
            # Two checkpoints scraped, so rates over them have two points; GPM ratios need two GPU readings.
            prom.wait_until("two checkpoints scraped", lambda: prom.query(
                "orchestrator_checkpoint_duration_seconds_count >= 2")["data"]["result"], 180, job)
            prom.wait_until("the tensor ratio of both simulated GPUs", lambda: len(prom.query(
                "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE")["data"]["result"]) == 2, 120, job)

            def rules_evaluated() -> bool:
                rules = [r for g in prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
                return len(rules) == len(_rule_exprs()) and all(r["lastEvaluation"] > "2000" for r in rules)
            prom.wait_until("every alert rule evaluated", rules_evaluated, 60, job)

            rules = [r for g in prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
            assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
            for name, expr in _rule_exprs():
                answer = prom.query(expr)
                assert answer["status"] == "success", (name, expr, answer)
            for title, expr in _dashboard_exprs():
                answer = prom.query(expr)
                assert answer["status"] == "success", (title, expr, answer)
                assert answer["data"]["result"], f"dashboard panel {title!r} has no data: {expr}"
            [loss] = prom.query("orchestrator_training_loss")["data"]["result"]
            assert 0 < float(loss["value"][1]) < 10
            # The prediction beside the run's held-out loss: the final one as given, the one at the last
            # evaluated step from the trajectory (3.5 falling by 1.5 over 5000 steps).
            final = {r["metric"]["bound"]: float(r["value"][1])
                     for r in prom.query("orchestrator_predicted_final_loss")["data"]["result"]}
            assert final == {"point": 2.0, "low": 1.9, "high": 2.1}
            [heldout] = prom.query("orchestrator_heldout_loss")["data"]["result"]
            at = {r["metric"]["bound"]: float(r["value"][1])
                  for r in prom.query("orchestrator_predicted_heldout_loss")["data"]["result"]}
            assert 3.3 < at["low"] < at["point"] < at["high"] <= 3.6 and 0 < float(heldout["value"][1]) < 6, at
            ranks = prom.query("orchestrator_rank_up")["data"]["result"]
            assert sorted(r["metric"]["rank"] for r in ranks) == ["0", "1"]
            run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
            assert all(r["metric"]["run_id"] == run_id for r in ranks)
            # The GPU series come from the node agent's endpoint, found through the targets file.
            tensor = prom.query("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE")["data"]["result"]
            assert {(r["metric"]["job"], r["metric"]["rank"], r["metric"]["run_id"]) for r in tensor} == {
                ("orchestrator-gpus", "0", run_id), ("orchestrator-gpus", "1", run_id)}, tensor
            assert {r["metric"]["instance"] for r in tensor} != {started["target"]}
            # Each simulated GPU joins its rank: the rank's step time beside its GPU's utilization.
            joined = prom.query("DCGM_FI_DEV_GPU_UTIL * on(rank) group_left(node) "
                                "(orchestrator_rank_info * on(rank) group_left orchestrator_rank_step_time_seconds)")
            assert sorted(r["metric"]["rank"] for r in joined["data"]["result"]) == ["0", "1"], joined
    finally:
        if job.poll() is None:
            job.send_signal(signal.SIGINT)
            job.wait(timeout=60)
    assert of_kind(events(run_dir), "run_finished")[-1]["reason"] == "interrupted"
    targets = json.loads((run_dir / "prometheus" / "gpu-targets.json").read_text())
    assert targets == [{"targets": [], "labels": {"run_id": run_id}}], "a finished run's endpoints are gone"


def test_taken_port_is_a_clear_error_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(*launch_args(tmp_path / "run", f"metrics.port={port}"), timeout=60)
    assert result.returncode == 2
    assert f"metrics.port: 127.0.0.1:{port} is already in use" in result.stderr
    assert not (tmp_path / "run").exists()


CONFIG = {"parallel": {"zero_stage": 2, "tensor_parallel": 1}}


def _step(ts: float, step: int, step_time_s: float, loss: float | None = None, **fields: Any) -> ev.Step:
    return ev.Step(ts=ts, step=step, loss=loss, step_time_s=step_time_s, tokens_per_s=fields.pop("tokens_per_s", None),
                   **fields)


def _started(ts: float, world_size: int = 2) -> ev.RunStarted:
    return ev.RunStarted(ts=ts, run_id="r1", world_size=world_size, resumed_from_step=0, config=CONFIG)


def _worker(ts: float, rank: int, node_ip: str) -> ev.WorkerStarted:
    return ev.WorkerStarted(ts=ts, rank=rank, pid=rank, node="n", node_ip=node_ip, node_id="id", attempt=0,
                            spare=False, forked=False)


def _failed(ts: float, rank: int, reason: str, root_cause: bool = True) -> ev.FailureDetected:
    return ev.FailureDetected(ts=ts, rank=rank, reason=reason, message="", attempt=0, detection_s=0.2 if root_cause else 0.01,
                              root_cause=root_cause)


def _committed(ts: float, step: int, blocked_s: float, seconds: float = 0.3, size: int = 1234) -> ev.CheckpointCommitted:
    return ev.CheckpointCommitted(ts=ts, step=step, path="p", seconds=seconds, blocked_s=blocked_s, bytes=size)


def _finished(ts: float) -> ev.RunFinished:
    return ev.RunFinished(ts=ts, status="succeeded", step=4, final_loss=None, restarts=1, restarts_by_reason={},
                          failures_by_reason={})


def test_goodput_splits_wall_time_by_cause() -> None:
    tracker = GoodputTracker()
    for event in [
        _started(100.0),
        _step(110.0, step=1, step_time_s=1.0),            # startup 9 s
        _step(111.0, step=2, step_time_s=1.0),
        _committed(111.5, step=2, blocked_s=0.5),
        _step(113.0, step=3, step_time_s=1.0),
        dataclasses.replace(_failed(114.0, 1, "signal"), detection_s=0.25),
        _step(116.0, step=3, step_time_s=1.0),            # recomputed: lost work; recovery 1 s
        _step(117.0, step=4, step_time_s=1.0),
        _finished(120.0),
    ]:
        tracker.on_event(event)
    report = tracker.report(now=500.0)
    assert report.wall_s == 20.0 and report.productive_s == 4.0 and report.ratio == 0.2
    assert report.badput_s == {"startup": 9.0, "checkpoint": 0.5, "failure_detection": 0.25, "recovery": 1.0,
                               "lost_work": 1.0, "other": 4.25}


def test_job_metrics_follow_the_event_log() -> None:
    from prometheus_client import generate_latest

    metrics = JobMetrics(clock=lambda: 130.0)
    for event in [
        _started(100.0),
        _step(110.0, step=7, loss=2.5, step_time_s=0.1, tokens_per_s=1000.0, lr=0.003, grad_norm=0.4),
        _failed(111.0, rank=1, reason="signal"),
        _failed(111.0, rank=0, reason="exception", root_cause=False),  # as older logs have them
        ev.RecoveryStarted(ts=111.5, attempt=1, reason="signal", mode="in_place", replaced=[1], rejoined=[0],
                           resume_from=None, restarts_left=2),
        _committed(112.0, step=10, blocked_s=0.02),
        ev.CheckpointFailed(ts=113.0, step=20, rank=0, path="p", error="No space left on device", message="m"),
    ]:
        metrics.on_event(event)
    metrics.watch_ranks(lambda: [RankSample(0, True, 0.5, 7, 0.1), RankSample(1, False, 4.0, 6, 0.3)])
    text = generate_latest(metrics.registry).decode()
    assert "orchestrator_heldout_loss" not in text, "no evaluation reported: no series, rather than a 0"
    for line in ['orchestrator_training_loss 2.5', 'orchestrator_training_step 7.0', 'orchestrator_learning_rate 0.003',
                 'orchestrator_grad_norm 0.4', 'orchestrator_tokens_per_second 1000.0',
                 'orchestrator_restarts_total{reason="signal"} 1.0', 'orchestrator_failures_total{reason="signal"} 1.0',
                 'orchestrator_checkpoint_failures_total 1.0', 'orchestrator_checkpoint_last_step 10.0',
                 'orchestrator_rank_up{rank="1"} 0.0', 'orchestrator_rank_heartbeat_age_seconds{rank="1"} 4.0',
                 'orchestrator_rank_step_time_seconds{rank="1"} 0.3', 'orchestrator_wall_seconds 30.0']:
        assert line in text, line
    assert 'orchestrator_failures_total{reason="exception"} 0.0' in text, "a rank failing because its peer died is no failure of its own"
    for reason in ("exit", "hang", "node_lost", "checkpoint"):  # zero from the start: increase() sees the first
        assert f'orchestrator_restarts_total{{reason="{reason}"}} 0.0' in text, reason
    assert "orchestrator_model_flops_utilization" not in text, "no MFU without a known GPU peak"


def test_a_shrunk_job_has_no_series_for_the_ranks_it_dropped() -> None:
    from prometheus_client import generate_latest

    metrics = JobMetrics(clock=lambda: 130.0)
    metrics.on_event(_started(100.0, world_size=4))
    world = [RankSample(r, True, 0.5, 7, 0.1) for r in range(4)]
    metrics.watch_ranks(lambda: world)
    for r in range(4):
        metrics.on_event(_worker(101.0, r, f"10.0.0.{r // 2}"))
    metrics.on_event(ev.WorldShrunk(ts=120.0, world_size=2, world_size_before=4, nodes=1, nodes_before=2,
                                    lost_node_slots=[1], global_batch=32, accumulation_steps=2))
    del world[2:]  # the controller's view of the ranks after the shrink
    text = generate_latest(metrics.registry).decode()
    assert 'orchestrator_run_info{run_id="r1",tensor_parallel="1",world_size="2",zero_stage="2"} 1.0' in text
    assert 'world_size="4"' not in text
    assert 'orchestrator_rank_up{rank="1"} 1.0' in text
    assert not any(f'rank="{r}"' in text for r in (2, 3)), "series of dropped ranks removed"


def test_above_the_per_rank_limit_ranks_are_served_per_node_with_quantiles_and_the_slowest() -> None:
    """16 ranks on 4 nodes, limit 8: no per-rank series; per node the ranks down, oldest progress,
    lowest step, slowest step; for the job the step-time quantiles and the slowest ranks."""
    from prometheus_client import generate_latest

    metrics = JobMetrics(per_rank_limit=8)
    for r in range(16):
        metrics.on_event(_worker(1.0, r, f"10.0.0.{r // 4}"))
    samples = [RankSample(r, r != 5, 0.5 + r, 100 - r, 1.0 + r / 100) for r in range(16)]
    metrics.watch_ranks(lambda: samples)
    text = generate_latest(metrics.registry).decode()
    assert "orchestrator_rank_up" not in text and "orchestrator_rank_info" not in text
    for line in ['orchestrator_node_ranks_down{node="10.0.0.1"} 1.0', 'orchestrator_node_ranks_down{node="10.0.0.0"} 0.0',
                 'orchestrator_node_heartbeat_age_seconds{node="10.0.0.1"} 7.5', 'orchestrator_node_step{node="10.0.0.1"} 93.0',
                 'orchestrator_node_step_time_seconds{node="10.0.0.3"} 1.15',
                 'orchestrator_rank_step_time_quantile_seconds{quantile="0.5"} 1.07',
                 'orchestrator_rank_step_time_quantile_seconds{quantile="1"} 1.15',
                 'orchestrator_slowest_rank_step_time_seconds{node="10.0.0.3",rank="15"} 1.15']:
        assert line in text, line
    assert text.count("orchestrator_slowest_rank_step_time_seconds{") == 10
    small = JobMetrics(per_rank_limit=16)
    small.watch_ranks(lambda: samples)
    assert 'orchestrator_rank_up{rank="5"} 0.0' in generate_latest(small.registry).decode(), "at the limit: per rank"


def test_the_prediction_follows_the_evaluated_steps_and_a_mismatched_one_is_refused(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from orchestrator.config.loader import load_config
    from orchestrator.errors import ConfigError
    from orchestrator.scaling.predict import for_run, load

    overrides = ["train.steps=1001", "evaluation.heldout_bytes=262144"]
    path = _prediction_for(overrides, tmp_path / "prediction.json")
    metrics = JobMetrics(prediction=load(path))
    metrics.on_event(_step(1.0, step=251, loss=3.0, step_time_s=0.1, heldout_loss=3.2))
    text = generate_latest(metrics.registry).decode()
    for line in ['orchestrator_predicted_final_loss{bound="point"} 2.0', 'orchestrator_predicted_final_loss{bound="high"} 2.1',
                 'orchestrator_heldout_loss 3.2', 'orchestrator_predicted_heldout_loss{bound="point"} 3.125']:
        assert line in text, line  # step 251: a quarter of the way from 3.5 (step 1) to 2.0 (step 1001)
    metrics.on_event(_step(2.0, step=252, loss=3.0, step_time_s=0.1))
    assert 'orchestrator_predicted_heldout_loss{bound="point"} 3.125' in generate_latest(metrics.registry).decode(), \
        "the prediction moves only with an evaluation, so that the two compare the same step"
    assert for_run(path, load_config(REPO / "cluster_configs" / "local.yaml", overrides))["target"]
    with pytest.raises(ConfigError, match="made for N=.*launch the plan's target"):
        for_run(path, load_config(REPO / "cluster_configs" / "local.yaml", ["train.steps=2000", *overrides[1:]]))
    for other_heldout_set in (["train.steps=1001"], [*overrides, "evaluation.batches=16"]):
        with pytest.raises(ConfigError, match="add --set evaluation.heldout_bytes=262144 --set evaluation.batches=32"):
            for_run(path, load_config(REPO / "cluster_configs" / "local.yaml", other_heldout_set))
    stale = {**json.loads(path.read_text()), "version": 1}
    path.write_text(json.dumps(stale))
    with pytest.raises(ConfigError, match="prediction version 1.*scaling fit PLAN"):
        load(path)


def _promtool_test(path: Path, input_series: list[dict[str, str]], cases: list[dict[str, Any]],
                   rules: Path = ASSETS / "alerts.yml") -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` of ``rules``: ``input_series`` a sample a minute, evaluated every
    minute, against the alert ``cases``; the unit test is written to ``path``."""
    test = {"rule_files": [str(rules)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": input_series, "alert_rule_test": cases}]}
    path.write_text(yaml.safe_dump(test))
    return subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)


def _fires_as_expected_and_can_fail(path: Path, series: list[dict[str, str]], cases: list[dict[str, Any]]) -> None:
    """The alert ``cases`` pass ``promtool test rules``; with the firing case (the second) expecting
    nothing instead, they fail: the cases can tell a firing alert from a quiet one."""
    result = _promtool_test(path, series, cases)
    assert result.returncode == 0, result.stdout + result.stderr
    quiet = [cases[0], {**cases[1], "exp_alerts": []}, *cases[2:]]
    assert _promtool_test(path, series, quiet).returncode != 0


@needs_prometheus
def test_promtool_fires_the_prediction_alert_only_outside_the_interval(tmp_path: Path) -> None:
    """promtool test rules: the held-out loss above the predicted interval for 20 minutes fires after
    the rule's 15 minutes; inside it, nothing fires."""
    series = []
    for instance, loss in (("a", "2.5"), ("b", "2.1")):
        labels = f'job="orchestrator",instance="{instance}"'
        series += [{"series": f"orchestrator_heldout_loss{{{labels}}}", "values": f"{loss}+0x30"},
                   {"series": f'orchestrator_predicted_heldout_loss{{{labels},bound="low"}}', "values": "2.0+0x30"},
                   {"series": f'orchestrator_predicted_heldout_loss{{{labels},bound="high"}}', "values": "2.2+0x30"}]
    cases = [
        {"eval_time": "10m", "alertname": "OrchestratorLossOffPrediction", "exp_alerts": []},
        {"eval_time": "20m", "alertname": "OrchestratorLossOffPrediction",
         "exp_alerts": [{"exp_labels": {"job": "orchestrator", "instance": "a", "severity": "warning"},
                         "exp_annotations": {"summary": "Held-out loss 2.5 has been outside the scaling "
                                                        "prediction's interval for 15 minutes"}}]},
    ]
    _fires_as_expected_and_can_fail(tmp_path / "prediction_alert_test.yml", series, cases)


@needs_prometheus
def test_promtool_fires_the_xid_alert_on_a_new_xid_and_stops_after_the_window(tmp_path: Path) -> None:
    """DCGM_FI_DEV_XID_ERRORS keeps the last XID: the alert fires when it changes to a new XID and
    stops 10 minutes later, although the value stays; a GPU that never had one stays quiet."""
    labels = 'job="orchestrator",instance="a",Hostname="node1",rank="0"'
    series = [{"series": f'DCGM_FI_DEV_XID_ERRORS{{{labels},gpu="0"}}', "values": "0 0 0 79+0x30"},
              {"series": f'DCGM_FI_DEV_XID_ERRORS{{{labels},gpu="1"}}', "values": "0+0x33"}]
    cases = [
        {"eval_time": "2m", "alertname": "GpuXidError", "exp_alerts": []},
        {"eval_time": "5m", "alertname": "GpuXidError",
         "exp_alerts": [{"exp_labels": {"job": "orchestrator", "instance": "a", "Hostname": "node1",
                                        "rank": "0", "gpu": "0", "severity": "critical"},
                         "exp_annotations": {"summary": "XID 79 on GPU 0 of node1 (rank 0)"}}]},
        {"eval_time": "20m", "alertname": "GpuXidError", "exp_alerts": []},
    ]
    path = tmp_path / "xid_alert_test.yml"
    result = _promtool_test(path, series, cases)
    assert result.returncode == 0, result.stdout + result.stderr
    # The same case against the rule as it was (value > 0): it keeps firing at 20m, so the case fails.
    old_rules = tmp_path / "alerts_old.yml"
    old_rules.write_text((ASSETS / "alerts.yml").read_text().replace(
        "DCGM_FI_DEV_XID_ERRORS > 0 and changes(DCGM_FI_DEV_XID_ERRORS[10m]) > 0", "DCGM_FI_DEV_XID_ERRORS > 0"))
    assert old_rules.read_text() != (ASSETS / "alerts.yml").read_text()
    assert _promtool_test(path, series, cases, rules=old_rules).returncode != 0, "the case cannot tell the rules apart"


@needs_prometheus
def test_promtool_fires_the_spare_nodes_alert_once_a_spare_is_gone(tmp_path: Path) -> None:
    """One spare configured: quiet while it is there; a minute after it is lost, the alert fires."""
    labels = 'job="orchestrator",instance="a"'
    series = [{"series": f"orchestrator_spare_nodes{{{labels}}}", "values": "1+0x5 0+0x10"},
              {"series": f"orchestrator_spare_nodes_configured{{{labels}}}", "values": "1+0x16"}]
    cases = [
        {"eval_time": "4m", "alertname": "OrchestratorSpareNodesLow", "exp_alerts": []},
        {"eval_time": "9m", "alertname": "OrchestratorSpareNodesLow",
         "exp_alerts": [{"exp_labels": {"job": "orchestrator", "instance": "a", "severity": "warning"},
                         "exp_annotations": {"summary": "0 spare node(s) left of those configured: the next "
                                                        "lost node has nowhere to go"}}]},
    ]
    _fires_as_expected_and_can_fail(tmp_path / "spare_alert_test.yml", series, cases)
