"""A rank blocked in a gloo collective is released by aborting its attempt's connections
(orchestrator/worker/abort.py), with real processes and a real gloo group."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.processes, pytest.mark.timeout(180)]


def test_abort_releases_a_collective_blocked_on_a_live_peer(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    go = tmp_path / "go"
    script = str(REPO / "tests" / "blocked_collective.py")
    peer = subprocess.Popen([sys.executable, script, "1", str(port), str(go)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Without the abort, rank 0 would wait in its all-reduce until rank 1 leaves: it never does
        # before rank 0 has finished (the go file is written only after), so this would time out.
        rank0 = subprocess.run([sys.executable, script, "0", str(port), str(go)], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert peer.poll() is None, "the peer was still in the group when rank 0 was released"
    finally:
        go.touch()
        out, _ = peer.communicate(timeout=60)
    assert rank0.returncode == 0, rank0.stdout + rank0.stderr
    lines = rank0.stdout.splitlines()
    # The group's abort (NCCL's ncclCommAbort; nothing for gloo) ran from the other thread too.
    aborted = re.fullmatch(r"aborted (\d+) group\(s\), (\d+) connection\(s\)", next(
        (line for line in lines if line.startswith("aborted ")), ""))
    assert aborted and aborted.group(1) == "1" and aborted.group(2) != "0", lines
    assert any(line.startswith("released after ") for line in lines), rank0.stdout + rank0.stderr
    # Listening sockets are left alone (gloo aborts the process when its listener fails), and so is a
    # connection the process held before the attempt.
    assert "kept connection works: True" in lines, lines
    assert peer.returncode == 0, out
