"""Scripts written for torchrun, run unmodified: `orchestrator launch CONFIG -- script.py ARGS`.

Each test runs the real CLI (and, where the comparison matters, torchrun itself) on the scripts in
tests/scripts/, and checks what a user sees: the environment, the event log, the terminal.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.installation import with_interpreter_tools
from tests.helpers import (
    REPO,
    cli,
    events,
    launch_args,
    of_kind,
    pid_alive,
    running_cli,
    wait_for_event,
    wait_gone,
)

pytestmark = [pytest.mark.processes, pytest.mark.timeout(420)]
SCRIPTS = REPO / "tests" / "scripts"


def torchrun(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``torchrun`` of this environment, on loopback, from the repository root."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), *args]
    # DS_ACCELERATOR: what a CPU user sets for DeepSpeed under torchrun (the orchestrator sets it per rank);
    # TORCH_EXTENSIONS_DIR (with_interpreter_tools): this installation's prebuilt ops, not a JIT build.
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=with_interpreter_tools({**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                                      **(env or {})}))


def test_a_script_sees_torchruns_environment_contract(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    under_torchrun = torchrun("--max-restarts", "3", str(SCRIPTS / "torchrun_env.py"), str(theirs))
    assert under_torchrun.returncode == 0, under_torchrun.stderr[-3000:]
    run_dir = tmp_path / "run"
    result = cli(*launch_args(run_dir), "--", "tests/scripts/torchrun_env.py", str(ours))
    assert result.returncode == 0, result.stderr[-3000:]

    for rank in (0, 1):
        seen = json.loads((ours / f"rank{rank}.json").read_text())
        expected = json.loads((theirs / f"rank{rank}.json").read_text())
        assert {k for k, v in seen["env"].items() if v is not None} == set(expected["env"]), "the same names"
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                     "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT",
                     "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                     "MASTER_ADDR"):
            assert seen["env"][name] == expected["env"][name], name
        assert seen["sum"] == expected["sum"] == 3.0, "the env:// rendezvous joined both ranks"
        assert seen["main"] == "__main__" and seen["cwd"] == str(REPO), "run as `python script.py` from the launch dir"
        assert seen["argv"] == [str(SCRIPTS / "torchrun_env.py"), str(ours)]
        assert seen["env"]["TORCHELASTIC_RUN_ID"] == json.loads((run_dir / "run.json").read_text())["run_id"]

    evs = events(run_dir)
    assert of_kind(evs, "step") == [] and of_kind(evs, "run_finished")[0]["step"] is None
    header = next(line for line in result.stderr.splitlines() if line.startswith("run "))
    assert "script" in header and "torchrun_env.py" in header and "ZeRO" not in header, header
    assert "succeeded: no steps were reported" in result.stdout


def test_a_quiet_script_is_left_alone_and_its_hangs_are_still_caught(tmp_path: Path) -> None:
    """A script that never reports: not killed while it runs past the stuck limit, first in a loop on
    one line of native calls (busy, its stack still), then training; a SIGSTOPped rank is caught after
    hang_timeout_s, a rank stuck (peer waiting in a collective) after stuck_timeout_s."""
    hang_s, stuck_s = 4.0, 6.0
    run_dir = tmp_path / "run"
    with running_cli(*launch_args(run_dir, f"fault_tolerance.hang_timeout_s={hang_s}",
                                  f"fault_tolerance.stuck_timeout_s={stuck_s}"),
                     "--", "tests/scripts/quiet_loop.py", "--seconds", "16", "--stall-attempt", "1",
                     "--busy-s", str(stuck_s + 2)) as proc:
        rank1 = wait_for_event(run_dir, lambda e: e["event"] == "worker_started" and e["rank"] == 1, 120, proc)
        log = run_dir / "logs" / "rank1.log"
        deadline = time.monotonic() + 120
        while "iterations" not in log.read_text() and "looping" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the script never started its loop"
            time.sleep(0.1)
        # Longer than stuck_timeout_s, all of it in the one-line busy loop: it uses CPU, so it is not hung.
        time.sleep(stuck_s + 2)
        assert of_kind(events(run_dir), "failure_detected") == [], "a healthy quiet script was killed"
        os.kill(rank1["pid"], signal.SIGSTOP)
        stopped_at = time.time()
        frozen = wait_for_event(run_dir, lambda e: e["event"] == "failure_detected", 60, proc)
        output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert frozen["rank"] == 1 and frozen["reason"] == "hang" and "no sign of life" in frozen["message"]
    assert frozen["ts"] - stopped_at <= hang_s + 2.5, "a stopped rank is caught within hang_timeout_s"
    # A script that reports nothing: rank 0's own output on the terminal (train.show_output: auto), as torchrun's.
    assert "[rank 0] looping" in output and "[rank 0] rank 0: " in output, output[-3000:]
    assert "[rank 1]" not in output and "[rank 0] ===" not in output
    assert "step" not in frozen, "a script that reports no steps has no step to blame"

    evs = events(run_dir)
    causes = [e for e in of_kind(evs, "failure_detected") if e["root_cause"]]
    assert [(c["rank"], c["attempt"]) for c in causes] == [(1, 0), (1, 1)]
    stuck = causes[1]
    assert "has been blocked for" in stuck["message"] and "limit 6s" in stuck["message"], stuck
    assert [e["mode"] for e in of_kind(evs, "recovery_started")] == ["full_restart", "full_restart"]
    finished = of_kind(evs, "recovery_finished")
    assert [(e["attempt"], e["signal"]) for e in finished] == [(2, "alive")], finished
    assert finished[0]["resumed_from_step"] is None
    assert wait_gone([e["pid"] for e in of_kind(evs, "worker_started")]) == []


def _kill_rank1_after_the_first_save(run_dir: Path, *args: str) -> tuple[str, list[dict], int]:
    """``launch`` with ``args`` (config items, then ``--`` and the script); SIGKILL rank 1 once the
    script's step-10 checkpoint is reported; the run's output, events and controller pid once it succeeded."""
    items = list(args[:args.index("--")])
    with running_cli(*launch_args(run_dir, *items), *args[args.index("--"):]) as proc:
        wait_for_event(run_dir, lambda e: e["event"] == "checkpoint_saved" and e["step"] == 10, 240, proc)
        rank1 = [e for e in events(run_dir) if e["event"] == "worker_started" and e["rank"] == 1][-1]
        os.kill(rank1["pid"], signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    return output, events(run_dir), proc.pid


@pytest.fixture(scope="module")
def hf_under_torchrun(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Losses by step of the Hugging Face script under torchrun, uninterrupted."""
    out = tmp_path_factory.mktemp("torchrun") / "out"
    result = torchrun(str(SCRIPTS / "hf_clm.py"), "--output_dir", str(out), "--deepspeed",
                      str(SCRIPTS / "ds_zero2.json"), timeout=300)
    state_file = out / "checkpoint-30" / "trainer_state.json"
    # Under plain torchrun a rank sometimes aborts in interpreter teardown after its work is done (a gloo
    # thread still joinable: "terminate called without an active exception", STACK-NOTES); the
    # reference losses are written by then. Our own ranks end without that teardown (process.exit_process).
    teardown_abort = "terminate called without an active exception" in result.stderr and state_file.exists()
    assert result.returncode == 0 or teardown_abort, result.stderr[-4000:]
    state = json.loads(state_file.read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def test_a_hugging_face_trainer_script_recovers_from_a_killed_rank(
    hf_under_torchrun: dict[int, float], tmp_path: Path
) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "out"
    output, evs, controller = _kill_rank1_after_the_first_save(
        run_dir, "fault_tolerance.hang_timeout_s=60", "--", "tests/scripts/hf_clm.py", "--output_dir", str(out),
        "--deepspeed", "tests/scripts/ds_zero2.json", "--report")
    cause = next(e for e in of_kind(evs, "failure_detected") if e["root_cause"])
    assert cause["rank"] == 1 and cause["reason"] == "signal" and cause["step"] >= 10, cause
    assert [e["mode"] for e in of_kind(evs, "recovery_started")] == ["full_restart"]
    (finished,) = of_kind(evs, "recovery_finished")
    # The kill follows the step-10 save's event, which is written in a batch: the script may have saved
    # step 20 meanwhile, and then resumes from that one.
    resumed = finished["resumed_from_step"]
    assert finished["signal"] == "resumed" and resumed in (10, 20) and resumed <= cause["step"], finished

    steps = of_kind(evs, "step")
    assert max(e["step"] for e in steps) == 30 and all(e["loss"] is not None for e in steps)
    after = [e for e in steps if e["ts"] > finished["ts"]]
    assert after and after[0]["step"] == resumed + 1, "the script resumed from its own checkpoint"
    for event in after:
        assert math.isclose(event["loss"], hf_under_torchrun[event["step"]], rel_tol=0, abs_tol=1e-6), event
    saved = of_kind(evs, "checkpoint_saved")
    assert [e["step"] for e in saved][-1] == 30 and all(e["by"] == "script" for e in saved)
    assert "step 30/30" in output, "progress with the Trainer's max_steps as total"
    assert "succeeded: step 30, final loss" in output
    assert wait_gone([e["pid"] for e in of_kind(evs, "worker_started")]) == []
    assert not pid_alive(controller)



def test_a_lightning_script_with_the_callback_recovers_from_a_killed_rank_bit_exact(tmp_path: Path) -> None:
    """An unmodified PyTorch Lightning DDP script (ModelCheckpoint(save_last=True), resumed from
    last.ckpt) plus the one-line callback: every step is reported with the loss it has under
    torchrun, a SIGKILLed rank restarts the script from its own checkpoint, and the steps after the
    resume are torchrun's, bit for bit."""
    reference = tmp_path / "torchrun"
    result = torchrun(str(SCRIPTS / "lightning_ddp.py"), "--output_dir", str(reference), "--max_steps", "300",
                      timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    under_torchrun = {int(line.split()[1]): float(line.split()[3])
                      for line in result.stdout.splitlines() if line.startswith("step ")}
    assert sorted(under_torchrun) == list(range(1, 301)), result.stdout[-2000:]
    run_dir, out = tmp_path / "run", tmp_path / "out"
    output, evs, _ = _kill_rank1_after_the_first_save(
        run_dir, "--", "tests/scripts/lightning_ddp.py", "--output_dir", str(out), "--max_steps", "300", "--report")
    cause = next(e for e in of_kind(evs, "failure_detected") if e["root_cause"])
    assert (cause["rank"], cause["reason"]) == (1, "signal"), cause
    (finished,) = of_kind(evs, "recovery_finished")
    assert finished["signal"] == "resumed" and finished["resumed_from_step"] % 10 == 0, finished
    steps = of_kind(evs, "step")
    after = [e for e in steps if e["ts"] > finished["ts"]]
    assert after and after[0]["step"] == finished["resumed_from_step"] + 1, "resumed from its own last.ckpt"
    assert all(under_torchrun[e["step"]] == e["loss"] for e in steps), "the same losses as under torchrun"
    assert max(e["step"] for e in steps) == 300 and "step 300/300" in output
    assert [e["step"] for e in of_kind(evs, "checkpoint_saved")][-1] == 300
    assert wait_gone([e["pid"] for e in of_kind(evs, "worker_started")]) == []


def test_the_zygote_preimports_a_scripts_packages_from_pythonpath_too_but_not_its_own_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.config.schema import TrainConfig
    from orchestrator.worker.script import third_party_imports

    (tmp_path / "libs" / "lightning_like").mkdir(parents=True)
    (tmp_path / "libs" / "lightning_like" / "__init__.py").write_text("")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "helpers.py").write_text("")
    script = tmp_path / "proj" / "train.py"
    script.write_text("import json\nimport lightning_like\nimport helpers\nfrom torch import nn\n")
    monkeypatch.syspath_prepend(str(tmp_path / "libs"))  # as PYTHONPATH would
    found = third_party_imports(TrainConfig(script=str(script)))
    assert found == [("lightning_like", []), ("torch", ["nn"])], "the stdlib and the script's own module left out"
