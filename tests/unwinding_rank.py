"""A stand-in training process for the agent's unwinding: on an interrupt it leaves at once (reports
ready) with ``UNWIND=leave``, or never with ``UNWIND=stay``; with ``UNWIND=left`` it has left already
(reports ready at once, then ignores interrupts). It trains in attempt 0, then in each it is told to
rejoin (its reports name the attempt, as a rank's do). It prints each message it is given."""

import os

from orchestrator.messages import Ready
from orchestrator.worker.channel import CONTROL_FD_ENV, Channel

channel = Channel.from_fd(int(os.environ[CONTROL_FD_ENV]))
channel.attempt = 0
if os.environ["UNWIND"] == "left":
    channel.send(Ready())
for message in channel.messages():
    print(f"got {message.type}", flush=True)
    if message.type == "rejoin":
        channel.attempt = message.attempt
    if message.type == "interrupt" and os.environ["UNWIND"] == "leave":
        channel.send(Ready())
