"""The network environment of a node's ranks, detected on that node from ``cluster.network``.

Which interface carries gloo/NCCL sockets, which InfiniBand (or RoCE) adapters NCCL
uses, and with which GID index, depend on the node: the node agent runs this
there and the controller lays the result under each rank's environment (a
variable in ``cluster.env`` wins). Everything read from the kernel's device tree
goes through one ``sysfs_root`` so tests and ``orchestrator network
--sysfs-root`` can point it at a fake tree.

Detection, per key:

- ``interface: auto``: the interface whose address this node uses to reach the
  head node (a connected UDP socket tells the source address; no packet is sent).
- ``ib_hca: auto``: every ``class/infiniband/DEV`` with a port whose ``state`` is
  ACTIVE, as ``DEV:PORT``; none found: ``NCCL_IB_DISABLE=1``, NCCL uses sockets.
- ``ib_gid_index: auto``: on a RoCE port (``link_layer`` Ethernet), the lowest
  GID of type "RoCE v2" that maps an IPv4 address, as ``show_gids`` would list it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Config, NetworkConfig

_SIOCGIFADDR = 0x8915
_IPV4_MAPPED_PREFIX = "0000:0000:0000:0000:0000:ffff:"
# NCCL turns a failed peer or a hung collective into an error the rank reports instead of a silent
# hang: its watchdog aborts the communicators and the rank's wait raises (2, CleanUpOnly), and the
# process lives on, so that a survivor can rejoin in place with its CUDA context (1 would kill it).
NCCL_ERROR_HANDLING = "2"
_FAST_FAILURE = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": NCCL_ERROR_HANDLING}


@dataclass(frozen=True, kw_only=True, slots=True)
class IbPort:
    """One port of an InfiniBand or RoCE adapter, as sysfs shows it."""

    device: str
    port: int
    state: str
    link_layer: str
    roce_v2_ipv4_gid: int | None = None

    @property
    def active(self) -> bool:
        return self.state == "ACTIVE"


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeNetwork:
    """What was chosen for one node, and the variables that say so to gloo, NCCL and torch."""

    interface: str | None
    address: str | None
    ib_ports: list[IbPort] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the terminal."""
        ib = ",".join(f"{p.device}:{p.port}" for p in self.ib_ports if p.active) or "none"
        return f"interface {self.interface or '?'} ({self.address or 'no address'}), InfiniBand {ib}"

    def as_event(self) -> dict[str, Any]:
        """The ``network_configured`` event's fields (the node's are added by the caller)."""
        return {"interface": self.interface, "address": self.address,
                "ib_ports": [asdict(p) for p in self.ib_ports], "env": self.env}


def configure(config: Config, head_addr: str, sysfs_root: str | Path = "/sys") -> NodeNetwork:
    """Detect this node's network per ``config.cluster.network`` for ranks that rendezvous at ``head_addr``."""
    settings = config.cluster.network
    root = Path(sysfs_root)
    interface, address = _interface(settings, head_addr)
    ports = ib_ports(root)
    env: dict[str, str] = {}
    if interface is not None:
        env["GLOO_SOCKET_IFNAME"] = interface
    if config.cluster.device == "gpu":
        env.update(_FAST_FAILURE)
        if interface is not None:
            env["NCCL_SOCKET_IFNAME"] = interface
        env.update(_ib_env(settings, ports))
        if settings.nccl_debug is not None:
            env["NCCL_DEBUG"] = settings.nccl_debug
    # What the user set explicitly is what the ranks get.
    env = {k: v for k, v in env.items() if k not in config.cluster.env}
    return NodeNetwork(interface=interface, address=address, ib_ports=ports, env=env)


def ib_ports(sysfs_root: Path) -> list[IbPort]:
    """Every port of every adapter under ``SYSFS/class/infiniband``, in name order."""
    base = sysfs_root / "class" / "infiniband"
    if not base.is_dir():
        return []
    ports = []
    for device in sorted(base.iterdir()):
        for port_dir in sorted((device / "ports").glob("*"), key=lambda p: int(p.name) if p.name.isdigit() else 0):
            if not port_dir.name.isdigit():
                continue
            # state reads like "4: ACTIVE"; link_layer "InfiniBand" or "Ethernet" (RoCE).
            state = _read(port_dir / "state").partition(":")[2].strip() or _read(port_dir / "state")
            link_layer = _read(port_dir / "link_layer") or "InfiniBand"
            gid = _roce_v2_ipv4_gid(port_dir) if link_layer == "Ethernet" else None
            ports.append(IbPort(device=device.name, port=int(port_dir.name), state=state,
                                link_layer=link_layer, roce_v2_ipv4_gid=gid))
    return ports


def _ib_env(settings: NetworkConfig, ports: list[IbPort]) -> dict[str, str]:
    if settings.ib_hca == "none":
        return {"NCCL_IB_DISABLE": "1"}
    active = [p for p in ports if p.active]
    if settings.ib_hca == "auto":
        if not active:
            return {"NCCL_IB_DISABLE": "1"}
        env = {"NCCL_IB_HCA": ",".join(f"{p.device}:{p.port}" for p in active)}
    else:
        env = {"NCCL_IB_HCA": settings.ib_hca}
        named = {name.split(":")[0] for name in settings.ib_hca.lstrip("=^").split(",")}
        active = [p for p in active if p.device in named]
    if isinstance(settings.ib_gid_index, int):
        env["NCCL_IB_GID_INDEX"] = str(settings.ib_gid_index)
    elif settings.ib_gid_index == "auto":
        gids = [p.roce_v2_ipv4_gid for p in active if p.roce_v2_ipv4_gid is not None]
        if gids:
            env["NCCL_IB_GID_INDEX"] = str(min(gids))
    return env


def _interface(settings: NetworkConfig, head_addr: str) -> tuple[str | None, str | None]:
    if settings.interface != "auto":
        first = settings.interface.split(",")[0]
        return settings.interface, interface_addresses().get(first)
    address = route_source(head_addr)
    if address is None:
        return None, None
    names = [name for name, addr in interface_addresses().items() if addr == address]
    return (names[0] if names else None), address


def route_source(head_addr: str) -> str | None:
    """The local address this node uses to reach ``head_addr`` (nothing is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((head_addr, 9))
            return sock.getsockname()[0]
    except OSError:
        return None


def interface_addresses() -> dict[str, str]:
    """Interface name -> its IPv4 address, for interfaces that have one."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def _roce_v2_ipv4_gid(port_dir: Path) -> int | None:
    types = port_dir / "gid_attrs" / "types"
    if not types.is_dir():
        return None
    for entry in sorted(types.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 1 << 30):
        if not entry.name.isdigit() or _read(entry).lower() != "roce v2":
            continue
        gid = _read(port_dir / "gids" / entry.name)
        if gid.startswith(_IPV4_MAPPED_PREFIX) and _is_real_ipv4(gid):
            return int(entry.name)
    return None


def _is_real_ipv4(gid: str) -> bool:
    tail = gid.removeprefix(_IPV4_MAPPED_PREFIX).replace(":", "")
    try:
        return not ipaddress.IPv4Address(bytes.fromhex(tail)).is_unspecified
    except ValueError:
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
