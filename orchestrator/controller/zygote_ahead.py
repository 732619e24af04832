"""The local node's zygote, started by the controller before an embedded Ray, for its agent to adopt.

Starting an embedded Ray takes seconds of its own (~3.5 s on 2 cores), and the
node's zygote then spends seconds more importing torch and DeepSpeed before the
first rank can be forked. Started first, the zygote imports while Ray comes up.
It waits on an abstract Unix socket (``worker/zygote.py``); the node agent
connects there when the controller asks it to prepare, checks the peer is this
process, and adopts it: from then on it is the agent's zygote as if the agent
had started it (it exits when the agent's connection closes, its ranks with it).

The controller only offers it to an agent whose node settings (the environment
``worker/env.py`` gives the node) are those it was started with; otherwise, and
whenever it is not taken, it is stopped. It remains the controller's child: the
controller reaps it, and it dies with the controller (PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from orchestrator.installation import with_interpreter_tools
from orchestrator.run_dir import append_fd
from orchestrator.worker.process import PARENT_PID_ENV
from orchestrator.worker.zygote import CONFIG_ENV, LISTEN_ENV, zygote_env

_STOP_TIMEOUT_S = 5.0


class ZygoteAhead:
    """A zygote importing for ``config`` with the node settings ``node_env``, logging to ``log_path``."""

    def __init__(self, config: dict[str, Any], node_env: dict[str, str], log_path: Path) -> None:
        self.node_env = dict(node_env)
        self.name = f"orch-zygote-{secrets.token_hex(8)}"
        env = with_interpreter_tools({**os.environ, **zygote_env(node_env), LISTEN_ENV: self.name,
                                      CONFIG_ENV: json.dumps(config), PARENT_PID_ENV: str(os.getpid())})
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(append_fd(log_path), "ab") as log:
            log.write(b"=== zygote, started by the controller before Ray ===\n")
            log.flush()
            self._popen = subprocess.Popen([sys.executable, "-m", "orchestrator.worker.zygote"], env=env,
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        self._taken = False
        # Reaped whenever it ends: it is ours, though it works for the agent.
        threading.Thread(target=self._popen.wait, name="zygote-ahead-reaper", daemon=True).start()

    @property
    def pid(self) -> int:
        return self._popen.pid

    def offer(self, node_env: dict[str, str]) -> tuple[str, int] | None:
        """Where the agent of a node with settings ``node_env`` finds it (socket name, pid), once;
        None when it was started for other settings (it is then stopped) or is gone or taken."""
        if self._taken or self._popen.poll() is not None:
            return None
        self._taken = True
        if node_env != self.node_env:
            self.close()
            return None
        return self.name, self.pid

    def close(self) -> None:
        """Stop it if it still runs (the job is over, or no agent took it) and reap it."""
        if self._popen.poll() is None:
            try:
                os.killpg(self._popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self._popen.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
