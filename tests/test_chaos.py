"""The chaos soak, short: five faults of five kinds from outside, in one run of the local config,
which must end bit for bit like a clean run, with every checkpoint valid and nothing left behind,
each fault seen for what it was.

The same script as the long soak of ``docs/benchmarks.md`` (``bench/chaos.py``); here about a
minute of faults over a 300-step run, with its clean run first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, events, of_kind

pytestmark = [pytest.mark.processes, pytest.mark.timeout(600)]

KINDS = ("sigkill", "sigstop", "kill_during_save", "kill_actor", "kill_controller")
HANG_TIMEOUT_S = 4
# What the controller must call each fault, as the root cause of the failure that follows it.
SEEN_AS = {"sigkill": "signal", "kill_during_save": "signal", "sigstop": "hang", "kill_actor": "node_lost"}


def test_five_faults_of_five_kinds_end_like_a_clean_run(tmp_path: Path) -> None:
    args = [sys.executable, "bench/chaos.py", "--seed", "3", "--steps", "300", "--minutes", "1.5", "--min-gap", "5",
            "--max-gap", "8", "--faults", "5", "--hang-timeout", str(HANG_TIMEOUT_S), "--out", str(tmp_path)]
    for kind in KINDS:
        args += ["--only", kind]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=540, start_new_session=True)
    output = result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(summary["faults"]) == sorted(KINDS), output
    assert summary["loss_equal"], output
    assert summary["damaged"] == 0 and summary["left_behind"] == [], output
    assert result.returncode == 0, output

    evs = events(Path(summary["run_dir"]))
    for fault in summary["injected"]:
        after = [e for e in evs if e["ts"] > fault["at"]]
        if fault["kind"] == "kill_controller":  # the same command again resumes the run
            assert any(e["event"] == "run_started" for e in after), fault
            continue
        cause = next(e for e in after if e["event"] == "failure_detected" and e["root_cause"])
        assert cause["reason"] == SEEN_AS[fault["kind"]], (fault, cause)
        if fault["kind"] == "sigstop":
            assert cause["ts"] - fault["at"] <= HANG_TIMEOUT_S + 2, "a hang is caught within hang_timeout_s + 2 s"
        # Every other fault is recovered by the running controller: in place (only the failed rank
        # restarts), except a killed node agent, whose ranks (here: every rank) all died with it.
        finished = next(e for e in after if e["event"] == "recovery_finished")
        expected = "full_restart" if fault["kind"] == "kill_actor" else "in_place"
        assert finished["mode"] == expected, (fault, finished)
    assert len(of_kind(evs, "recovery_finished")) == len(KINDS) - 1
    assert len(of_kind(evs, "run_started")) == 2
    # The soak's snapshots are checkpoint.memory_interval_steps: auto: measured, then a power of two.
    assert any("snapshot_s" in e for e in of_kind(evs, "step")), "rank 0 reports its snapshots' cost"
    intervals = [e["interval_steps"] for e in of_kind(evs, "memory_interval")]
    assert intervals and all(n & (n - 1) == 0 for n in intervals), intervals
