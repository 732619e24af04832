"""Network detection against fake sysfs trees, in-process and through `orchestrator network --sysfs-root`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.worker.network import configure, ib_ports
from tests.helpers import cli

GPU = ["cluster.device=gpu"]
# RoCE GID tables list a link-local IPv6 GID per type first, then the IPv4-mapped ones.
ROCE_GIDS = {
    0: ("IB/RoCE v1", "fe80:0000:0000:0000:0a00:27ff:fe55:0001"),
    1: ("RoCE v2", "fe80:0000:0000:0000:0a00:27ff:fe55:0001"),
    2: ("IB/RoCE v1", "0000:0000:0000:0000:0000:ffff:0a4d:000b"),
    3: ("RoCE v2", "0000:0000:0000:0000:0000:ffff:0a4d:000b"),
}


def _port(root: Path, device: str, port: int, state: str, link_layer: str = "InfiniBand",
          gids: dict[int, tuple[str, str]] | None = None) -> None:
    base = root / "class" / "infiniband" / device / "ports" / str(port)
    base.mkdir(parents=True)
    code = {"ACTIVE": 4, "DOWN": 1, "INIT": 2}[state]
    (base / "state").write_text(f"{code}: {state}\n")
    (base / "link_layer").write_text(f"{link_layer}\n")
    for index, (kind, gid) in (gids or {}).items():
        for sub, text in (("gid_attrs/types", kind), ("gids", gid)):
            (base / sub).mkdir(parents=True, exist_ok=True)
            (base / sub / str(index)).write_text(text + "\n")


def _tree(tmp_path: Path, case: str) -> Path:
    root = tmp_path / case
    (root / "class" / "net").mkdir(parents=True)
    if case == "one_hca":
        _port(root, "mlx5_0", 1, "ACTIVE")
    elif case == "two_hcas_one_down":
        _port(root, "mlx5_0", 1, "DOWN")
        _port(root, "mlx5_1", 1, "ACTIVE")
    elif case == "roce":
        _port(root, "mlx5_0", 1, "ACTIVE", link_layer="Ethernet", gids=ROCE_GIDS)
    return root


EXPECTED = {
    "no_infiniband": {"NCCL_IB_DISABLE": "1"},
    "one_hca": {"NCCL_IB_HCA": "mlx5_0:1"},
    "two_hcas_one_down": {"NCCL_IB_HCA": "mlx5_1:1"},
    "roce": {"NCCL_IB_HCA": "mlx5_0:1", "NCCL_IB_GID_INDEX": "3"},
}
IB_KEYS = ("NCCL_IB_DISABLE", "NCCL_IB_HCA", "NCCL_IB_GID_INDEX")


@pytest.mark.parametrize("case", list(EXPECTED))
def test_detection_on_fake_sysfs(tmp_path: Path, case: str) -> None:
    found = configure(load_config(None, GPU), "127.0.0.1", _tree(tmp_path, case))
    assert {k: v for k, v in found.env.items() if k in IB_KEYS} == EXPECTED[case]
    # The interface that routes to the head node: loopback for a head on 127.0.0.1.
    assert found.interface == "lo" and found.address == "127.0.0.1"
    assert found.env["GLOO_SOCKET_IFNAME"] == found.env["NCCL_SOCKET_IFNAME"] == "lo"
    assert found.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2" and found.env["NCCL_DEBUG"] == "WARN"


@pytest.mark.parametrize("case", list(EXPECTED))
def test_orchestrator_network_prints_the_variables(tmp_path: Path, case: str) -> None:
    root = _tree(tmp_path, case)
    result = cli("network", "--sysfs-root", str(root), timeout=60)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert {k: v for k, v in printed.items() if k in IB_KEYS} == EXPECTED[case]
    assert printed["NCCL_SOCKET_IFNAME"] == "lo" and "interface lo" in result.stderr


def test_ports_read_from_sysfs(tmp_path: Path) -> None:
    ports = ib_ports(_tree(tmp_path, "two_hcas_one_down"))
    assert [(p.device, p.port, p.state, p.active) for p in ports] == [
        ("mlx5_0", 1, "DOWN", False), ("mlx5_1", 1, "ACTIVE", True)]
    roce = ib_ports(_tree(tmp_path, "roce"))[0]
    assert roce.link_layer == "Ethernet" and roce.roce_v2_ipv4_gid == 3


def test_explicit_settings_and_cluster_env_win(tmp_path: Path) -> None:
    root = _tree(tmp_path, "roce")
    config = load_config(None, [*GPU, "cluster.network.interface=eth7", "cluster.network.ib_gid_index=5",
                                "cluster.network.nccl_debug=INFO", "cluster.env.NCCL_IB_HCA=mlx5_9"])
    found = configure(config, "127.0.0.1", root)
    assert found.env["NCCL_SOCKET_IFNAME"] == found.env["GLOO_SOCKET_IFNAME"] == "eth7"
    assert found.env["NCCL_IB_GID_INDEX"] == "5" and found.env["NCCL_DEBUG"] == "INFO"
    assert "NCCL_IB_HCA" not in found.env, "cluster.env sets it; detection must not override it"
    off = configure(load_config(None, [*GPU, "cluster.network.ib_hca=none"]), "127.0.0.1", root)
    assert off.env["NCCL_IB_DISABLE"] == "1" and "NCCL_IB_HCA" not in off.env


def test_cpu_jobs_get_only_the_gloo_interface(tmp_path: Path) -> None:
    found = configure(load_config(None), "127.0.0.1", _tree(tmp_path, "one_hca"))
    assert found.env == {"GLOO_SOCKET_IFNAME": "lo"}


def test_bad_network_keys_are_config_errors() -> None:
    result = cli("validate", "cluster_configs/local.yaml", "--set", "cluster.network.ib_gid_index=-1", timeout=60)
    assert result.returncode == 2 and "cluster.network.ib_gid_index" in result.stderr
    result = cli("validate", "cluster_configs/local.yaml", "--set", "cluster.network.interfce=eth0", timeout=60)
    assert result.returncode == 2 and "did you mean cluster.network.interface" in result.stderr


def test_a_sysfs_root_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    """Not "InfiniBand none" for a typo: exit 2, naming the directory."""
    result = cli("network", "--sysfs-root", str(tmp_path / "missing"), timeout=60)
    assert result.returncode == 2 and f"--sysfs-root {tmp_path / 'missing'}: no such directory" in result.stderr
