"""Config loading and validation: every bad input names its key; good input round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import Config, load_config, parse_override
from orchestrator.errors import ConfigError
from tests.helpers import LOCAL_CONFIG, cli

# (overrides, text the one error message must contain)
BAD_OVERRIDES = [
    (["cluster.device=tpu"], "cluster.device"),
    (["cluster.nodes=0"], "cluster.nodes"),
    (["cluster.nodes=2"], "cluster.nodes: the embedded local Ray has one node"),
    (["cluster.workers_per_node=-1"], "cluster.workers_per_node"),
    (["cluster.workers_per_node=two"], "cluster.workers_per_node"),
    (["cluster.nodez=1"], "did you mean cluster.nodes"),
    (["cluster.env.RANK=3"], "RANK is set by the orchestrator"),
    (["cluster.env.1BAD=x"], "not a valid environment variable name"),
    (["cluster.env.ORCH_RUN_TOKEN=x"], "ORCH_RUN_TOKEN: variables named ORCH_* are the orchestrator's own"),
    (["parallel.zero_stage=4"], "parallel.zero_stage"),
    (["parallel.zero_stage=-1"], "parallel.zero_stage"),
    (["parallel.zero_stage=1.5"], "parallel.zero_stage"),
    (["parallel.tensor_parallel=0"], "parallel.tensor_parallel"),
    (["parallel.tensor_parallel=3"], "parallel.tensor_parallel: 3 does not divide the world size 2"),
    (["parallel.pipeline=2"], "parallel.pipeline: unknown key"),
    (["train.steps=0"], "train.steps"),
    (["train.steps=ten"], "train.steps"),
    (["train.seed=-5"], "train.seed"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["train.lr=0"], "train.lr"),
    (["train.precision=fp8"], "train.precision"),
    (["train.precision=fp16"], "train.precision: fp16 needs a GPU"),
    (["train.entrypoint=not a path"], "train.entrypoint"),
    (["model.dim=100", "model.heads=3"], "model.dim: 100 is not a multiple of model.heads=3"),
    (["model.heads=2", "parallel.tensor_parallel=2", "cluster.workers_per_node=4", "model.dim=128",
      "parallel.tensor_parallel=4"], "parallel.tensor_parallel: 4 does not divide model.heads=2"),
    (["checkpoint.interval_steps=-1"], "checkpoint.interval_steps"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["checkpoint.interval_steps=often"], "checkpoint.interval_steps"),
    (["checkpoint.interval_steps=auto", "train.script=train.py"], "checkpoint.interval_steps: auto is for training"),
    (["checkpoint.mtbf_s=0"], "checkpoint.mtbf_s"),
    (["fault_tolerance.max_restarts=-1"], "fault_tolerance.max_restarts"),
    (["fault_tolerance.hang_timeout_s=0"], "fault_tolerance.hang_timeout_s"),
    (["metrics.port=70000"], "metrics.port"),
    (["metrics.host="], "metrics.host"),
    (["metrics.enabled=maybe"], "metrics.enabled"),
    (["train=3"], "train"),
    (["bogus.key=1"], "bogus: unknown key"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_value_names_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(LOCAL_CONFIG, overrides)
    assert expected in str(err.value)


BAD_FILES = [
    ("cluster: [1, 2", "not valid YAML at line"),
    ("- just\n- a list\n", "must be a mapping of sections"),
    ("cluster:\n  device: gpu\n  devices: 2\n", "cluster.devices: unknown key; did you mean cluster.device"),
    ("train:\n  steps: 10\n  stepz: 20\n", "did you mean train.steps"),
    ("checkpoint: 5\n", "checkpoint"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_bad_file_names_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/job.yaml")


@pytest.mark.parametrize("item", ["train.steps", "=3", "train..steps=3", "train.steps=[1"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        parse_override(item)


def test_override_into_a_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match="train.steps is a value, not a section"):
        load_config(LOCAL_CONFIG, ["train.steps.x=1"])


def test_all_problems_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  steps: 0\n  lr: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "2 problems" in str(err.value)
    assert "train.steps" in str(err.value) and "train.lr" in str(err.value)


def test_local_config_has_every_contract_key() -> None:
    config = load_config(LOCAL_CONFIG)
    for key in [
        "cluster.ray_address", "cluster.nodes", "cluster.workers_per_node", "cluster.device",
        "parallel.zero_stage", "parallel.tensor_parallel", "train.steps", "train.seed",
        "train.micro_batch_size", "checkpoint.interval_steps", "checkpoint.keep_last",
        "fault_tolerance.max_restarts", "fault_tolerance.hang_timeout_s", "metrics.host", "metrics.port",
    ]:
        section, name = key.split(".")
        assert hasattr(getattr(config, section), name), key
    assert config.cluster.ray_address is None and config.cluster.world_size == 2
    assert config.metrics.host == "127.0.0.1"


def test_overrides_are_typed() -> None:
    config = load_config(
        LOCAL_CONFIG,
        ["train.steps=300", "train.lr=1e-3", "cluster.ray_address=auto", "cluster.nodes=2",
         "cluster.env.NCCL_IB_TIMEOUT=22", "metrics.enabled=false"],
    )
    assert config.train.steps == 300 and config.train.lr == pytest.approx(1e-3)
    assert config.cluster.world_size == 4
    assert config.cluster.env == {"NCCL_IB_TIMEOUT": "22"}
    assert config.metrics.enabled is False


def test_config_round_trips_through_json() -> None:
    config = load_config(LOCAL_CONFIG, ["parallel.zero_stage=3"])
    assert Config.model_validate(config.model_dump(mode="json")) == config


def test_every_cluster_config_is_valid() -> None:
    for path in sorted(LOCAL_CONFIG.parent.glob("*.yaml")):
        load_config(path)


# --- through the CLI ----------------------------------------------------------


def test_validate_ok() -> None:
    result = cli("validate", str(LOCAL_CONFIG), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "config OK: 2 ranks" in result.stdout


def test_launch_bad_config_starts_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = cli(*["launch", str(LOCAL_CONFIG), "--run-dir", str(run_dir), "--set", "cluster.device=tpu"], timeout=60)
    assert result.returncode == 2
    assert "cluster.device" in result.stderr
    assert not run_dir.exists(), "a rejected config must not create the run directory"


@pytest.mark.parametrize(("precision", "sections"), [
    ("fp32", set()), ("bf16", {"bf16"}), ("fp16", {"fp16"}),
])
def test_train_precision_becomes_deepspeeds_section(precision: str, sections: set[str]) -> None:
    from orchestrator.training.engine import deepspeed_config

    config = load_config(LOCAL_CONFIG, ["cluster.device=gpu", f"train.precision={precision}"])
    ds = deepspeed_config(config)
    assert {key for key in ("bf16", "fp16") if key in ds} == sections
    assert all(ds[key]["enabled"] is True for key in sections)
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0, "dynamic loss scaling"
