"""Plan a sweep of small runs that predicts a big one (``orchestrator scaling plan``).

The target is a config of the built-in GPT. Each sweep run is the same config with a smaller model
(width and depth scaled together, the target's head size kept) trained on proportionally fewer
tokens: every run keeps the target's tokens per parameter, so all of them, and the target, lie on
one line of the size/data plane and ``L(C) = a*C^b + c`` describes them. Batch, sequence length,
learning rate and data are the target's. Compute is ``6 * N * D`` FLOPs by default (N non-embedding
parameters, D tokens trained); ``--compute 6ND+attention`` adds attention's ``6 * layers * seq_len *
dim`` per token (Kaplan et al. 2020, eq. 2.1).

The run sizes are spaced evenly in log compute over ``span`` (at least two orders of magnitude),
with the largest chosen so that the whole sweep costs at most ``fraction`` of the target.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config.loader import load_config
from orchestrator.config.schema import Config, ModelConfig
from orchestrator.errors import ConfigError
from orchestrator.scaling.law import BOOTSTRAP_MIN_RUNS

COMPUTE_FORMULAS = ("6ND", "6ND+attention")
PLAN_VERSION = 1
# Every run of a sweep (and its target) evaluates on the same held-out bytes, at these settings,
# unless the config sets its own.
EVALUATION_DEFAULTS = {"evaluation.heldout_bytes": 262144, "evaluation.batches": 32}
# A run shorter than this learns too little to say anything about the law.
MIN_STEPS = 20


@dataclass(frozen=True)
class PlannedRun:
    """One run: its name (its run directory under the sweep's), the ``--set`` overrides that make it
    from the target config, and its size, tokens and compute."""

    name: str
    overrides: dict[str, Any]
    params: int
    tokens: int
    compute_flops: float


@dataclass
class Plan:
    """A target and the sweep that predicts it: what ``--out PLAN.json`` holds."""

    config: str
    set: list[str]
    compute: str
    sweep_compute_fraction: float
    target: PlannedRun
    runs: list[PlannedRun]
    version: int = PLAN_VERSION
    notes: list[str] = field(default_factory=list)

    @property
    def sweep_compute(self) -> float:
        return sum(r.compute_flops for r in self.runs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != PLAN_VERSION:
                raise ConfigError(f"{path}: plan version {data.get('version')!r}, this orchestrator reads {PLAN_VERSION}; "
                                  f"make it again with `orchestrator scaling plan`")
            data["target"] = PlannedRun(**data["target"])
            data["runs"] = [PlannedRun(**r) for r in data["runs"]]
            return cls(**data)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the plan ({exc.strerror})") from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{path}: not a plan written by `orchestrator scaling plan` ({exc})") from exc

    def run_config(self, run: PlannedRun) -> Config:
        """The full config of ``run`` (the target config, the plan's --set, the run's overrides)."""
        return load_config(self.config, [*self.set, *as_set(run.overrides)])


def non_embedding_params(model: ModelConfig) -> int:
    """Parameters outside the embeddings and the output layer: per block the four attention
    projections (4 d^2), the MLP (8 d^2) and two LayerNorms (4 d); then the final LayerNorm."""
    d = model.dim
    return model.layers * (12 * d * d + 4 * d) + 2 * d


def flops_per_token(model: ModelConfig, formula: str) -> float:
    """Training FLOPs per token under ``formula`` (forward and backward)."""
    flops = 6.0 * non_embedding_params(model)
    if formula == "6ND+attention":
        flops += 6.0 * model.layers * model.seq_len * model.dim
    return flops


def tokens_per_step(config: Config) -> int:
    """Tokens in one optimizer step: the global batch times the sequence length."""
    sequences = config.train.global_batch_size or config.train.micro_batch_size * config.data_parallel_size
    return sequences * config.model.seq_len


def make_plan(
    config_path: str, overrides: list[str], *, fraction: float, runs: int = 6, span: float = 100.0,
    compute: str = "6ND",
) -> Plan:
    """The sweep for the target ``config_path`` + ``overrides``: ``runs`` runs spaced evenly in log
    compute over ``span``, costing at most ``fraction`` of the target in all."""
    if compute not in COMPUTE_FORMULAS:
        raise ConfigError(f"--compute {compute!r}: use one of {', '.join(COMPUTE_FORMULAS)}")
    if not 0 < fraction < 1:
        raise ConfigError(f"--sweep-compute-fraction {fraction:g}: give a fraction of the target's compute, e.g. 0.01")
    if runs < BOOTSTRAP_MIN_RUNS:
        raise ConfigError(f"--runs {runs}: the fit's bootstrap interval needs at least {BOOTSTRAP_MIN_RUNS} runs")
    if span < 100:
        raise ConfigError(f"--span {span:g}: the sweep must span at least two orders of magnitude (100)")
    sets = [*(f"{k}={v}" for k, v in EVALUATION_DEFAULTS.items()), *overrides]
    target_config = load_config(config_path, sets)
    if not target_config.train.is_builtin:
        raise ConfigError("scaling plans the built-in GPT (train.entrypoint, train.script and train.module unset)")
    step_tokens = tokens_per_step(target_config)
    target = _run("target", target_config.model, target_config.train.steps, step_tokens, compute, {})
    ratio = target.tokens / target.params  # tokens per parameter, kept by every run

    shapes = _shapes(target_config.model)
    budget = fraction * target.compute_flops
    # Aim wider than asked: rounding to real shapes and whole steps narrows the span.
    aim = span * 1.2
    weights = [aim ** (-(runs - 1 - i) / (runs - 1)) for i in range(runs)]  # smallest first; largest 1
    largest = budget / sum(weights)
    for _ in range(20):  # rounding to real shapes and whole steps moves compute: shrink until it fits
        planned = []
        for i, weight in enumerate(weights):
            wanted_params = math.sqrt(largest * weight / (6.0 * ratio))
            if i == 0:  # the smallest rounds down, so that the sweep spans what was asked
                candidates = [s for s in shapes if _params(s, target_config.model) <= wanted_params] or shapes[:1]
            else:  # each bigger than the last: no two runs of one size
                candidates = [s for s in shapes if _params(s, target_config.model) > planned[-1].params] or shapes[-1:]
            layers, dim, heads = min(candidates, key=lambda s: _distance(s, wanted_params, target_config.model))
            model = target_config.model.model_copy(update={"layers": layers, "dim": dim, "heads": heads})
            steps = max(MIN_STEPS, round(ratio * non_embedding_params(model) / step_tokens))
            overrides_i = {"model.layers": layers, "model.dim": dim, "model.heads": heads, "train.steps": steps}
            planned.append(_run(f"run{i + 1:02d}", model, steps, step_tokens, compute, overrides_i))
        total = sum(r.compute_flops for r in planned)
        if total <= budget:
            break
        largest *= 0.97 * budget / total
    else:
        raise ConfigError(f"no sweep of {runs} runs fits {fraction:g} of the target's compute: the target is too small "
                          f"for runs of at least {MIN_STEPS} steps; raise --sweep-compute-fraction or train the target longer")
    sizes = [(r.params, r.tokens) for r in planned]
    if len(set(sizes)) < len(sizes):
        raise ConfigError(f"the target is too small for {runs} distinct smaller models within {fraction:g} of its compute: "
                          f"plan fewer runs (--runs) or a larger fraction")
    achieved = planned[-1].compute_flops / planned[0].compute_flops
    if achieved < span:
        raise ConfigError(f"the sweep spans only {achieved:.0f}x in compute (wanted {span:g}x): the smallest model "
                          f"cannot get smaller than {shapes[0][0]} layer(s) of dim {shapes[0][1]}; make the target bigger")
    return Plan(config=str(Path(config_path).resolve()), set=sets, compute=compute, sweep_compute_fraction=fraction,
                target=target, runs=planned)


def _run(name: str, model: ModelConfig, steps: int, step_tokens: int, formula: str,
         overrides: dict[str, Any]) -> PlannedRun:
    tokens = steps * step_tokens
    return PlannedRun(name=name, overrides=overrides, params=non_embedding_params(model), tokens=tokens,
                      compute_flops=flops_per_token(model, formula) * tokens)


def _shapes(target: ModelConfig) -> list[tuple[int, int, int]]:
    """(layers, dim, heads) smaller than the target, with its head size: width in whole heads."""
    head = target.dim // target.heads
    shapes = [(layers, heads * head, heads) for layers in range(1, target.layers + 1)
              for heads in range(1, target.heads + 1)]
    return sorted(shapes, key=lambda s: _params(s, target))


def _params(shape: tuple[int, int, int], target: ModelConfig) -> int:
    return non_embedding_params(target.model_copy(update={"layers": shape[0], "dim": shape[1]}))


def _distance(shape: tuple[int, int, int], wanted_params: float, target: ModelConfig) -> float:
    """How far ``shape`` is from ``wanted_params`` (log scale), with a small pull towards the target's
    width-to-depth ratio so that width and depth shrink together."""
    layers, dim, _ = shape
    params = _params(shape, target)
    aspect = math.log((dim / layers) / (target.dim / target.layers))
    return abs(math.log(params / wanted_params)) + 0.1 * abs(aspect)


def as_set(overrides: dict[str, Any]) -> list[str]:
    """``--set`` items for ``overrides``."""
    return [f"{key}={value}" for key, value in overrides.items()]
