"""Bad input through the real CLI: config values and files, arguments, damaged run directories and
unreadable entry points. Each exits 2 (or 1) with one message naming what to fix, without a
traceback, and an existing run directory keeps everything it had."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator import events as ev
from orchestrator.events import EventLog
from orchestrator.run_dir import RunDir
from tests.helpers import LOCAL_CONFIG, cli, commit_for_test, launch_args

RUN = "{run}"  # replaced by the case's copy of the existing run directory


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    expect: str  # what the one message must say
    code: int = 2
    damage: Callable[[Path], object] = lambda run: None
    files: dict[str, str] = field(default_factory=dict)  # module files importable by the entry point


def launch(*overrides: str) -> tuple[str, ...]:
    return tuple(launch_args(Path(RUN), *overrides))


def write(relative: str, text: str) -> Callable[[Path], object]:
    return lambda run: (run / relative).write_text(text)


def replace_by(relative: str, make: Callable[[Path], object]) -> Callable[[Path], object]:
    def damage(run: Path) -> None:
        target = run / relative
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        make(target)
    return damage


def config_file(text: str | bytes) -> Callable[[Path], object]:
    """The run directory's sibling ``job.yaml`` holds ``text``; the case's args name it."""
    def damage(run: Path) -> None:
        path = run.parent / "job.yaml"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return damage


JOB = "{run}/../job.yaml"

CASES = [
    # config values
    Case("device", launch("cluster.device=tpu"), "cluster.device"),
    Case("zero-stage", launch("parallel.zero_stage=4"), "parallel.zero_stage"),
    Case("tp-divides", launch("parallel.tensor_parallel=3"), "parallel.tensor_parallel: 3 does not divide"),
    Case("steps", launch("train.steps=0"), "train.steps"),
    Case("heads", launch("model.dim=100", "model.heads=3"), "model.dim: 100 is not a multiple of model.heads=3"),
    Case("port", launch("metrics.port=70000"), "metrics.port"),
    Case("orch-env", launch("cluster.env.ORCH_RUN_TOKEN=x"), "variables named ORCH_* are the orchestrator's own"),
    Case("unknown-section", launch("bogus.key=1"), "bogus: unknown key"),
    Case("typo", launch("cluster.nodez=1"), "did you mean cluster.nodes"),
    Case("embedded-nodes", launch("cluster.nodes=2"), "the embedded local Ray has one node"),
    # config files
    Case("yaml-syntax", ("validate", JOB), "is not valid YAML at line 1", damage=config_file("cluster: [1, 2")),
    Case("yaml-list", ("validate", JOB), "must be a mapping of sections", damage=config_file("- a\n- b\n")),
    Case("yaml-binary", ("validate", JOB), "is not UTF-8 text", damage=config_file(b"\x00\xff\xfe")),
    Case("config-missing", ("launch", "/nonexistent/job.yaml", "--run-dir", RUN), "does not exist"),
    Case("config-is-dir", ("validate", "{run}/.."), "cannot be read: Is a directory"),
    # arguments
    Case("set-no-value", ("launch", str(LOCAL_CONFIG), "--run-dir", RUN, "--set", "train.steps"), "--set"),
    Case("fault-kind", launch() + ("--inject-fault", "explode@0:3"), "expected KIND@RANK:STEP"),
    Case("fault-rank", launch() + ("--inject-fault", "kill@5:3"), "rank must be below the world size 2"),
    Case("no-config", ("launch",), "the following arguments are required: config"),
    Case("command", ("frobnicate",), "invalid choice: 'frobnicate'"),
    Case("checkpoints-action", ("checkpoints", "frob", RUN), "invalid choice: 'frob'"),
    Case("dev-cluster-nodes", ("dev-cluster", "up", "--nodes", "0"), "--nodes and --cpus-per-node must be at least 1"),
    # damaged or foreign run directories
    Case("run-dir-is-file", launch(), "exists and is not a directory",
         damage=lambda run: (shutil.rmtree(run), run.write_text("x"))),
    Case("checkpoints-is-file", launch(), "checkpoints is not a directory there",
         damage=replace_by("checkpoints", lambda p: p.write_text("x"))),
    Case("run-json-not-json", launch(), "run.json: not JSON", damage=write("run.json", "{not json")),
    Case("run-json-no-id", launch(), "run.json: no run_id in it", damage=write("run.json", "{}")),
    Case("events-is-dir", launch(), "cannot append to", damage=replace_by("events.jsonl", Path.mkdir)),
    Case("events-symlink", launch(), "not a directory or a symlink",
         damage=replace_by("events.jsonl", lambda p: p.symlink_to("/dev/null"))),
    Case("group-writable", launch(), "chmod go-w", damage=lambda run: run.chmod(0o775)),
    Case("all-damaged", launch(), "every checkpoint is damaged",
         damage=lambda run: [write(f"checkpoints/global_step{s}/manifest.json", "x")(run) for s in (10, 20)]),
    Case("verify-damaged", ("checkpoints", "verify", RUN), "shard.pt", code=1,
         damage=write("checkpoints/global_step20/shard.pt", "y")),
    Case("verify-not-a-run", ("checkpoints", "verify", "{run}/logs"), "no checkpoints/ directory"),
    Case("metrics-not-a-run", ("metrics", "{run}/checkpoints"), "no events.jsonl"),
    # entry points
    Case("entry-module", launch("train.entrypoint=no_such_module:train"), "module 'no_such_module' is not importable"),
    Case("entry-function", launch("train.entrypoint=user_mod:tran"), "defines no 'tran' (its functions: train)",
         files={"user_mod.py": "def train(ctx):\n    pass\n"}),
    Case("entry-syntax", launch("train.entrypoint=broken_mod:train"), "broken_mod.py, line 2: '(' was never closed",
         files={"broken_mod.py": "def train(ctx):\n    return (\n"}),
    Case("entry-stdlib", launch("train.entrypoint=os:no_such_function"), "defines no 'no_such_function'"),
    # scripts (`launch CONFIG -- script.py ARGS`)
    Case("script-missing", launch() + ("--", "no_such_script.py"), "no_such_script.py is not a file"),
    Case("script-syntax", launch() + ("--", "{run}/../broken_script.py"), "line 1: '(' was never closed",
         files={"broken_script.py": "print(\n"}),
    Case("script-module", launch() + ("--", "-m", "no_such_module_x"), "train.module: 'no_such_module_x' is not importable"),
    Case("script-nothing", launch() + ("--",), "nothing after `--`"),
    Case("script-option", launch() + ("--", "--lr", "3"), "not the option '--lr'"),
    Case("script-and-entry", launch("train.entrypoint=os:getcwd", "train.script=x.py"),
         "give one of train.entrypoint, train.script and train.module"),
    Case("script-args-alone", launch("train.args=[--lr, '3']"), "train.args: arguments are for train.script"),
    Case("script-not-launch", ("checkpoints", "list", RUN, "--", "x.py"), "is for launch and validate only"),
]


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as a finished run leaves it: run id, events, logs, two committed checkpoints."""
    run = RunDir.open(tmp_path_factory.mktemp("existing") / "run")
    events = EventLog(run.events)
    events.emit(ev.RunStarted(run_id=run.run_id, world_size=2, resumed_from_step=0, config={}))
    events.emit(ev.RunFinished(status="succeeded", step=20, final_loss=2.5, restarts=0, restarts_by_reason={},
                               failures_by_reason={}))
    events.close()
    (run.logs / "rank0.log").write_text("step 20\n")
    for step in (10, 20):
        commit_for_test(run, step)
    (run.checkpoints / "latest").write_text("global_step20")
    return run.path


def contents(root: Path) -> dict[str, bytes]:
    if not root.is_dir():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != ".lock"}


def test_there_are_at_least_30_distinct_bad_inputs() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_message_and_loses_nothing(case: Case, existing_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(existing_run, run, symlinks=True)
    case.damage(run)
    for name, text in case.files.items():
        (tmp_path / name).write_text(text)
    events_before = (run / "events.jsonl").read_bytes() if (run / "events.jsonl").is_file() else None
    before = contents(run)

    result = cli(*(a.replace(RUN, str(run)) for a in case.args), timeout=120,
                 env={"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))})

    output = result.stderr + result.stdout if case.code == 1 else result.stderr
    assert result.returncode == case.code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert case.expect in output, output
    if case.code == 2:  # argparse adds its usage lines; the progress display its start-up notes
        lines = result.stderr.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("orchestrator")]
        assert len(starts) == 1 and case.expect in "\n".join(lines[starts[0]:]), result.stderr
    after = contents(run)
    if events_before is not None:  # the event log may only grow (a refusal after start is recorded)
        assert (run / "events.jsonl").read_bytes().startswith(events_before)
        before.pop("events.jsonl"), after.pop("events.jsonl")
    assert {k: v for k, v in after.items() if k in before} == before, "something in the run directory changed"
