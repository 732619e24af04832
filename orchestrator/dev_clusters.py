"""Where this machine's dev clusters (``orchestrator dev-cluster``) keep their state, and their tokens:
the bottom layer, because connecting to Ray needs the token and creating the clusters needs the place."""

from __future__ import annotations

import json
import os
from pathlib import Path


def state_root() -> Path:
    """The directory of every dev cluster's state (``ORCH_DEV_CLUSTER_DIR``, default ``/tmp/orch-dc``)."""
    return Path(os.environ.get("ORCH_DEV_CLUSTER_DIR", "/tmp/orch-dc"))


def token_for(address: str) -> Path | None:
    """The Ray token of the dev cluster at ``address``, if one of ours runs there."""
    for path in state_root().glob("*/cluster.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("address") == address:
            return path.parent / "token"
    return None
