"""A stand-in training process that breaks the protocol: one valid beat, then a message no one defined."""

import os
import socket
import time

from orchestrator.worker.channel import CONTROL_FD_ENV

sock = socket.socket(fileno=int(os.environ[CONTROL_FD_ENV]))
sock.sendall(b'{"type": "alive", "where": "here", "in_collective": false}\n')
sock.sendall(b'{"type": "stepp", "step": 1}\n')
time.sleep(60)
