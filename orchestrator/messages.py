"""Every message between a rank's training process, its node agent, the node's zygote and the controller.

Each kind is a frozen dataclass; on the control socket (JSON lines, ``channel.py``) it travels as
its fields plus ``type``. :func:`decode` refuses an unknown type and a missing or unexpected field,
so a typo on either side is an error at once, not a message silently lost.

    agent -> process    Prepare, Start, Rejoin, Interrupt, Stop
    process -> agent    Alive (the liveness beat) and Ready (torn down after an error), kept by the
                        agent; Warm; and the reports the controller polls: Step, Resumed, Saving,
                        CheckpointSaved, ScriptCheckpoint, CheckpointSkipped, CheckpointFailed,
                        FaultInjected, Error, Finished
    agent -> zygote     Prepare, Fork (with the child's control socket attached)
    zygote -> agent     Forked, Exited

Reports carry ``at``: when the agent received them, on the node's clock (the worker group moves it
onto the controller's). The agent pushes a :class:`NodeStatus` to the controller: a
:class:`RankStatus` per rank it hosts that has news, its ranks' checkpoint saves folded into one
:class:`NodeSaved` per checkpoint and their errors that are consequences into :class:`NodeLeft`,
every rank's :class:`NodeBeat`; on that connection it travels as :func:`encode_status`'s form,
packed (:func:`pack`, :class:`Unpacker`).
``Ready`` stays with the agent: it follows every ``Error``, which tells the controller all it needs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message; ``type`` names the kind on the wire."""

    type: ClassVar[str]


@dataclass(frozen=True, kw_only=True)
class Report(Message):
    """A message the controller reads: stamped ``at`` by the agent on receipt, and with the ``attempt``
    it belongs to by the process's channel as it is sent (-1: none yet, a spare's warm-up). The
    controller takes only the current attempt's: a survivor's word on how it left the last one, or a
    status made before an attempt began and read after, is not news of this one."""

    at: float = 0.0
    attempt: int = -1


# --- agent -> process (and zygote) ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Prepare(Message):
    """Warm up for this job (a spare, or the zygote): imports, the entry point's warm-up."""

    type: ClassVar[str] = "prepare"
    config: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Start(Message):
    """Train as ``rank`` in ``attempt``: a fresh process, or a promoted spare (``log_path`` set: its new log)."""

    type: ClassVar[str] = "start"
    rank: int
    local_rank: int
    world_size: int
    node: str
    attempt: int
    config: dict[str, Any]
    run_dir: str
    resume_tag: str | None
    faults: list[dict[str, Any]]
    env: dict[str, str]
    workdir: str = ""
    log_path: str | None = None
    checkpoint_interval: int | None = None  # checkpoint.interval_steps: auto: the controller's latest
    memory_interval: int | None = None  # checkpoint.memory_interval_steps: auto: the controller's latest
    mirror_key: str = ""  # the run's key for the memory snapshots' side channel (worker/mirror.py), hex


@dataclass(frozen=True, kw_only=True)
class Rejoin(Start):
    """A survivor of a failure trains again, in this live process, in the new attempt."""

    type: ClassVar[str] = "rejoin"


# checkpoint.interval_steps: auto: steps between checkpoints until the first save has been measured.
FIRST_CHECKPOINT_INTERVAL = 50


@dataclass(frozen=True, kw_only=True)
class Cadence(Message):
    """To rank 0 (``checkpoint.interval_steps: auto``): save every ``interval_steps`` steps from now on;
    to every rank (``checkpoint.memory_interval_steps: auto``): snapshot every ``memory_interval_steps``;
    to every rank (a preemption): save a checkpoint at step ``save_at_step`` as well."""

    type: ClassVar[str] = "cadence"
    interval_steps: int | None = None
    memory_interval_steps: int | None = None
    save_at_step: int | None = None


@dataclass(frozen=True, kw_only=True)
class Interrupt(Message):
    """Stop training now (a peer failed): raise in the main thread, tear down, report ``Ready``."""

    type: ClassVar[str] = "interrupt"


@dataclass(frozen=True, kw_only=True)
class Stop(Message):
    """The agent is about to SIGTERM this process: that signal is the agent's, not a scheduler's
    (``worker/stop_signal.py``)."""

    type: ClassVar[str] = "stop"


@dataclass(frozen=True, kw_only=True)
class Fork(Message):
    """To the zygote: fork a spare with ``env`` logging to ``log_path``; its control socket is attached."""

    type: ClassVar[str] = "fork"
    id: int
    env: dict[str, str]
    log_path: str


# --- zygote -> agent -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Prepared(Message):
    """The zygote's imports are done: it can fork (``error`` empty), or it cannot and exits (why)."""

    type: ClassVar[str] = "prepared"
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class Forked(Message):
    """The spare of fork request ``id`` is process ``pid``."""

    type: ClassVar[str] = "forked"
    id: int
    pid: int


@dataclass(frozen=True, kw_only=True)
class Exited(Message):
    """A forked spare ended (Popen's convention: ``-N`` when killed by signal N)."""

    type: ClassVar[str] = "exited"
    pid: int
    returncode: int


# --- process -> agent ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Alive(Message):
    """Every second: where the main thread is, whether it waits in a collective, and for how long its
    call stack has not changed (``still_s``: how a rank that reports no steps shows progress)."""

    type: ClassVar[str] = "alive"
    where: str
    in_collective: bool
    still_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Warm(Report):
    """A spare finished its warm-up."""

    type: ClassVar[str] = "warm"


@dataclass(frozen=True, kw_only=True)
class Step(Report):
    """A finished step (``TrainContext.report``, ``orchestrator.report``); rank 0's become ``step``
    events. ``total``: the planned number of steps, when the training code knows it."""

    type: ClassVar[str] = "step"
    step: int
    loss: float | None
    step_time_s: float
    total: int | None = None
    tokens: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    flops: float | None = None
    extra: dict[str, float] = field(default_factory=dict)  # other keyword metrics, by name


@dataclass(frozen=True, kw_only=True)
class Resumed(Report):
    """Restored the state of ``step`` and continues after it: from checkpoint ``tag`` on disk, or from
    memory (``source``: ``memory``, the ranks' own copies and their buddies' mirrors)."""

    type: ClassVar[str] = "resumed"
    step: int
    tag: str
    source: str = "disk"


@dataclass(frozen=True, kw_only=True)
class Saving(Report):
    """Still waiting for a checkpoint write: busy, not hung."""

    type: ClassVar[str] = "saving"


@dataclass(frozen=True, kw_only=True)
class CheckpointSaved(Report):
    """This rank's part of checkpoint ``tag`` is durable in the staging directory of ``attempt``."""

    type: ClassVar[str] = "checkpoint_saved"
    step: int
    tag: str
    attempt: int
    blocked_s: float
    write_s: float
    files: dict[str, dict[str, Any]]  # name -> FileEntry fields (size, sha256)


@dataclass(frozen=True, kw_only=True)
class ScriptCheckpoint(Report):
    """The training code saved a checkpoint of its own (a script's, e.g. a Hugging Face Trainer's) at ``path``."""

    type: ClassVar[str] = "script_checkpoint"
    step: int
    path: str


@dataclass(frozen=True, kw_only=True)
class CheckpointSkipped(Report):
    """The save of ``step`` was skipped: the previous one was still being written (``when_busy: skip``)."""

    type: ClassVar[str] = "checkpoint_skipped"
    step: int
    attempt: int


@dataclass(frozen=True, kw_only=True)
class CheckpointFailed(Report):
    """This rank could not write its part of checkpoint ``tag``."""

    type: ClassVar[str] = "checkpoint_failed"
    step: int
    tag: str
    attempt: int
    path: str
    error: str
    errno: int | None = None


@dataclass(frozen=True, kw_only=True)
class FaultInjected(Report):
    """An ``--inject-fault`` fires now."""

    type: ClassVar[str] = "fault_injected"
    kind: str
    rank: int
    step: int


@dataclass(frozen=True, kw_only=True)
class Error(Report):
    """The training code raised (``interrupted``: because the controller stopped it; ``collective``:
    inside a collective, most likely because a peer failed); ``step``: the last step it reported
    (None: none yet)."""

    type: ClassVar[str] = "error"
    exc_type: str
    message: str
    traceback: str
    interrupted: bool
    step: int | None
    collective: bool = False


@dataclass(frozen=True, kw_only=True)
class Ready(Report):
    """Torn down after an error; waiting for ``Rejoin`` (or the end)."""

    type: ClassVar[str] = "ready"


@dataclass(frozen=True, kw_only=True)
class Finished(Report):
    """The training function returned and the last checkpoint is durable."""

    type: ClassVar[str] = "finished"


# --- agent -> controller -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RankStatus:
    """What a poll of the node agent says about one hosted rank process.

    ``returncode`` is None while it runs (negative: killed by that signal); ``exited_at`` when the
    agent saw it end; ``alive_at`` its last sign of life (any message, or the beat), ``where`` and
    ``in_collective`` from the last beat, ``moved_at`` when its call stack last changed; ``log_tail``
    the end of its log after a failed exit; ``oom`` what its node's memory was when the kernel's
    OOM killer killed it ("" where it did not).
    """

    pid: int
    reports: list[Report]
    returncode: int | None
    alive_at: float
    where: str
    in_collective: bool
    moved_at: float = 0.0
    exited_at: float | None = None
    log_tail: str = ""
    oom: str = ""

    def moved(self, skew: float) -> RankStatus:
        """The same status with its node-clock times moved by ``skew`` onto the controller's clock."""
        return dataclasses.replace(
            self,
            alive_at=self.alive_at + skew,
            moved_at=self.moved_at + skew,
            exited_at=self.exited_at + skew if self.exited_at is not None else None,
            reports=[dataclasses.replace(r, at=r.at + skew) for r in self.reports],
        )


@dataclass(frozen=True, kw_only=True)
class NodeBeat:
    """A heartbeat's word on every rank of a node, as columns (entry ``i`` is rank ``ranks[i]``'s):
    its process, liveness (as in :class:`RankStatus`) and latest step (``step`` None: none yet;
    ``step_attempt``: the attempt that step belongs to). Columns, not a status per rank: a
    controller reads thousands of these a second."""

    ranks: list[int]
    pid: list[int]
    alive_at: list[float]
    moved_at: list[float]
    where: list[str]
    in_collective: list[bool]
    step: list[int | None]
    step_at: list[float]
    step_time_s: list[float]
    step_attempt: list[int]

    def moved(self, skew: float) -> NodeBeat:
        """The same beat with its node-clock times moved by ``skew`` onto the controller's clock."""
        return dataclasses.replace(self, alive_at=[t + skew for t in self.alive_at],
                                   moved_at=[t + skew for t in self.moved_at], step_at=[t + skew for t in self.step_at])

    def only(self, entries: list[int]) -> NodeBeat:
        """The same beat with only the ranks of these entries (positions in the columns)."""
        return NodeBeat(**{name: [column[i] for i in entries]
                           for name, column in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))})


@dataclass(frozen=True, kw_only=True)
class NodeSaved:
    """Ranks ``ranks`` of one node saved their parts of checkpoint ``tag`` of ``attempt``: their
    :class:`CheckpointSaved` reports folded into one (a controller of 2,048 nodes reads 2,048 of
    these a checkpoint, not 16,384): the slowest rank's times, every rank's files, and when the last
    report came (``at``)."""

    ranks: list[int]
    step: int
    tag: str
    attempt: int
    blocked_s: float
    write_s: float
    files: dict[str, dict[str, Any]]
    at: float

    @classmethod
    def fold(cls, saves: list[tuple[int, CheckpointSaved]]) -> list[NodeSaved]:
        """One per checkpoint (tag and attempt) of these (rank, report) pairs."""
        by_checkpoint: dict[tuple[str, int], list[tuple[int, CheckpointSaved]]] = {}
        for rank, report in saves:
            by_checkpoint.setdefault((report.tag, report.attempt), []).append((rank, report))
        return [cls(ranks=[rank for rank, _ in group], step=group[0][1].step, tag=tag, attempt=attempt,
                    blocked_s=max(r.blocked_s for _, r in group), write_s=max(r.write_s for _, r in group),
                    files={name: entry for _, r in group for name, entry in r.files.items()},
                    at=max(r.at for _, r in group))
                for (tag, attempt), group in by_checkpoint.items()]


@dataclass(frozen=True, kw_only=True)
class NodeLeft:
    """Ranks ``ranks`` of one node left attempt ``attempt``'s training function with errors that are
    consequences, not causes (``collective``: raised in a collective, most likely because a peer
    failed; ``interrupted``: stopped by the controller): their :class:`Error` reports folded into one.
    Per rank, as columns (entry ``i`` is rank ``ranks[i]``'s): its process, when it raised, its last
    step; said once: the type, and the message and traceback of the earliest (the traceback as
    :func:`fold_consequences` sheds them). At 16,384 ranks a failure's consequences are 2,048 of these for
    the controller to read, not 16,384 rank statuses."""

    ranks: list[int]
    pid: list[int]
    at: list[float]
    step: list[int | None]
    exc_type: str
    message: str
    traceback: str
    interrupted: bool
    collective: bool
    attempt: int

    def moved(self, skew: float) -> NodeLeft:
        """The same report with its node-clock times moved by ``skew`` onto the controller's clock."""
        return dataclasses.replace(self, at=[t + skew for t in self.at])

    def only(self, entries: list[int]) -> NodeLeft:
        """The same report with only the ranks of these entries (positions in the columns)."""
        return dataclasses.replace(self, ranks=[self.ranks[i] for i in entries], pid=[self.pid[i] for i in entries],
                                   at=[self.at[i] for i in entries], step=[self.step[i] for i in entries])

    def errors(self) -> list[tuple[int, Error]]:
        """Each rank's error, as it was reported (the message and traceback as the earliest's)."""
        return [(rank, Error(exc_type=self.exc_type, message=self.message, traceback=self.traceback,
                             interrupted=self.interrupted, step=step, collective=self.collective, at=at,
                             attempt=self.attempt))
                for rank, at, step in zip(self.ranks, self.at, self.step)]


@dataclass(frozen=True, kw_only=True)
class NodeStatus:
    """What a node agent pushes to the controller (``agent/uplink.py``): the statuses of its ranks
    with news (reports other than a step of a rank but 0 or a checkpoint save, an exit), its ranks'
    checkpoint saves (``saved``) and errors that are consequences (``left``), every rank's
    :class:`NodeBeat`, its node's warm spare (pid, once warm), the push's ``number`` (the lease
    protocol, ``agent/node_agent.py``), the last request of the controller it answers (``asked``) and
    the node's clock when it was made."""

    ranks: dict[int, RankStatus]
    warm_spare: int | None
    number: int
    now: float
    asked: int = 0
    beat: NodeBeat | None = None
    saved: list[NodeSaved] = field(default_factory=list)
    left: list[NodeLeft] = field(default_factory=list)


def fold_consequences(ranks: dict[int, RankStatus]) -> tuple[dict[int, RankStatus], list[NodeLeft]]:
    """These statuses (of one node's push) less those whose only news is an error that is a
    consequence (collective or interrupted), folded into one :class:`NodeLeft` per attempt and kind
    of error; and with only the tracebacks a root cause can need: of every error that is not a
    consequence, and of the earliest collective error (when collective errors are all there is, the
    earliest is the root cause). Other consequences keep their messages. At 16,384 ranks a failure's
    consequences would otherwise be 16,384 statuses, each with a traceback of a few kilobytes."""
    keep = min(((report.at, rank) for rank, status in ranks.items() for report in status.reports
                if isinstance(report, Error) and report.collective and not report.interrupted), default=None)

    def shed(rank: int, report: Report) -> Report:
        if (isinstance(report, Error) and report.traceback and (report.interrupted or report.collective)
                and (report.at, rank) != keep):
            return dataclasses.replace(report, traceback="")
        return report

    kept: dict[int, RankStatus] = {}
    groups: dict[tuple[int, str, bool, bool], list[tuple[float, int, int, Error]]] = {}
    for rank, status in ranks.items():
        report = status.reports[0] if len(status.reports) == 1 else None
        if isinstance(report, Error) and (report.collective or report.interrupted) and status.returncode is None:
            key = (report.attempt, report.exc_type, report.interrupted, report.collective)
            groups.setdefault(key, []).append((report.at, rank, status.pid, report))
        elif any(isinstance(r, Error) for r in status.reports):
            kept[rank] = dataclasses.replace(status, reports=[shed(rank, r) for r in status.reports])
        else:
            kept[rank] = status
    left = []
    for (attempt, exc_type, interrupted, collective), group in groups.items():
        group.sort(key=lambda entry: entry[:2])
        _, rank, _, earliest = group[0]
        left.append(NodeLeft(ranks=[rank for _, rank, _, _ in group], pid=[pid for _, _, pid, _ in group],
                             at=[at for at, _, _, _ in group], step=[error.step for _, _, _, error in group],
                             exc_type=exc_type, message=earliest.message, traceback=shed(rank, earliest).traceback,
                             interrupted=interrupted, collective=collective, attempt=attempt))
    return kept, left


@dataclass(frozen=True, kw_only=True)
class StartedRank:
    """A rank process a node agent started for an attempt: its pid, and whether it is the node's
    promoted warm spare (``spare``) or was forked from the node's zygote (``forked``) rather than
    started fresh."""

    rank: int
    pid: int
    spare: bool = False
    forked: bool = False


_KINDS: dict[str, type[Message]] = {
    kind.type: kind
    for kind in (Prepare, Start, Rejoin, Cadence, Interrupt, Stop, Fork, Prepared, Forked, Exited, Alive, Warm, Step,
                 Resumed, Saving, CheckpointSaved, ScriptCheckpoint, CheckpointSkipped, CheckpointFailed, FaultInjected,
                 Error, Ready, Finished)
}


@functools.cache
def _names(kind: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(kind))


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields by name, not copied (``dataclasses.asdict`` copies every nested list)."""
    return {name: getattr(obj, name) for name in _names(type(obj))}


def encode(message: Message, attempt: int | None = None) -> dict[str, Any]:
    """The JSON-ready form: ``type`` and the fields (``at`` only once stamped). ``attempt`` stamps a
    report that names none (a rank's report, every step: cheaper than a copy of the message)."""
    fields = {"type": message.type, **_fields(message)}
    if isinstance(message, Report):
        if not message.at:
            del fields["at"]
        if attempt is not None and message.attempt < 0:
            fields["attempt"] = attempt
    return fields


class MalformedMessage(Exception):
    """A message that is not one of ours: a bug on the sending side (or mismatched versions)."""


def decode(data: Any) -> Message:
    """The message ``data`` encodes; :class:`MalformedMessage` names what is wrong with it."""
    fields = dict(data) if isinstance(data, dict) else {}
    kind = _KINDS.get(fields.pop("type", None))
    if kind is None:
        raise MalformedMessage(f"unknown message type in {str(data)[:200]}")
    try:
        return kind(**fields)
    except TypeError as exc:
        raise MalformedMessage(f"malformed {kind.type!r} message: {exc}") from None


def encode_status(status: NodeStatus) -> dict[str, Any]:
    """The JSON-ready form of a node's status (rank numbers become strings, as JSON keys must)."""
    ranks = {}
    for rank, rs in status.ranks.items():
        fields = _fields(rs)
        fields["reports"] = [encode(r) for r in rs.reports]
        ranks[str(rank)] = fields
    beat = None if status.beat is None else _beat_wire(status.beat)
    return {"ranks": ranks, "warm_spare": status.warm_spare, "number": status.number, "now": status.now,
            "asked": status.asked, "beat": beat, "saved": [_fields(saved) for saved in status.saved],
            "left": [_fields(left) for left in status.left]}


# A beat's times within this much of each other go on the wire as one: the earliest. A rank's last sign
# of life, call stack change or step is then told up to this much earlier than it was (hang detection
# errs by as much on the safe side: frozen is several seconds of silence, a hang 30 s without a step by default).
BEAT_TIME_SPREAD_S = 1.0
_BEAT_TIMES = frozenset({"alive_at", "moved_at", "step_at"})


def _beat_wire(beat: NodeBeat) -> dict[str, Any]:
    """A beat's JSON-ready form: ``ranks`` as a list, every other column as one value where it can be
    (equal entries; times within :data:`BEAT_TIME_SPREAD_S`). At 16,384 ranks the controller reads
    800 beats a second, and parsing eight copies of one value was most of what reading one cost."""
    wire: dict[str, Any] = {}
    for f in dataclasses.fields(NodeBeat):
        column = getattr(beat, f.name)
        if f.name == "ranks" or not column:
            wire[f.name] = column
        elif f.name in _BEAT_TIMES:
            earliest = min(column)
            wire[f.name] = earliest if max(column) - earliest <= BEAT_TIME_SPREAD_S else column
        else:
            first = column[0]
            wire[f.name] = first if all(value == first for value in column) else column
    return wire


def _beat_of(wire: dict[str, Any]) -> NodeBeat:
    count = len(wire["ranks"])
    columns = {}
    for name, value in wire.items():
        if not isinstance(value, list):
            value = [value] * count
        elif len(value) != count:
            raise MalformedMessage("a beat's columns differ in length")
        columns[name] = value
    return NodeBeat(**columns)


def decode_status(data: Any) -> NodeStatus:
    """The :class:`NodeStatus` ``data`` encodes; :class:`MalformedMessage` names what is wrong with it."""
    try:
        ranks = {}
        for rank, fields in data["ranks"].items():
            reports = [decode(r) for r in fields["reports"]]
            if not all(isinstance(r, Report) for r in reports):
                raise MalformedMessage(f"rank {rank}'s status carries a message that is not a report")
            ranks[int(rank)] = RankStatus(**{**fields, "reports": reports})
        beat = None if data["beat"] is None else _beat_of(data["beat"])
        return NodeStatus(ranks=ranks, warm_spare=data["warm_spare"], number=data["number"], now=data["now"],
                          asked=data["asked"], beat=beat, saved=[NodeSaved(**s) for s in data["saved"]],
                          left=[NodeLeft(**left) for left in data["left"]])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedMessage(f"malformed node status: {exc!r}") from None


# The uplink's wire (agent <-> controller): each message MessagePack, after its length (4 bytes, big
# endian). At 16,384 ranks the controller reads 800 pushes a second on one thread; parsing one as a
# JSON line took it 13-17 us, unpacking it takes 3. Framed by length, not by msgpack's streaming
# Unpacker: that one holds 43 KiB per connection (88 MB for 2,048 agents).
_LENGTH = 4


def pack(message: dict[str, Any]) -> bytes:
    """``message`` (a dict of JSON-ready values: str keys) as bytes for the uplink."""
    body = msgpack.packb(message)
    return len(body).to_bytes(_LENGTH, "big") + body


class Unpacker:
    """The messages of one connection's byte stream: :meth:`feed` what arrived, then iterate the
    messages it completed (a partial one waits for the rest). :class:`MalformedMessage` for bytes
    that are no message, or a message over ``max_size`` bytes (said as soon as its length arrives)."""

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._data = b""
        self._start = 0  # where in _data the next message begins

    def feed(self, data: bytes) -> None:
        self._data = self._data[self._start:] + data if self._start < len(self._data) else data
        self._start = 0

    def __iter__(self) -> Iterator[Any]:
        data = self._data
        while len(data) - self._start >= _LENGTH:
            begin = self._start + _LENGTH
            size = int.from_bytes(data[self._start:begin], "big")
            if size > self._max_size:
                raise MalformedMessage(f"a message of {size} bytes, over {self._max_size}")
            if len(data) < begin + size:
                return
            self._start = begin + size
            try:
                message = msgpack.unpackb(data[begin:self._start])
            except (ValueError, msgpack.UnpackException) as exc:
                raise MalformedMessage(f"bytes that are no message ({exc})") from None
            yield message
