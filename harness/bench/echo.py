"""The far end of the transport benchmark, run as its own process:
`python -m harness.bench.echo MODE ...`.

  frame shm PATH       serve ECHO frames on side 1 of a shm channel
  frame fd FD [L B]    serve ECHO frames on an inherited socket (with the
                       link model: latency L ns, B bytes/s, on its replies)
  raw-echo FD SIZE     echo SIZE-byte messages on a socket, no framing
  raw-sink FD SIZE     swallow SIZE-byte messages, ack at EOF"""

from __future__ import annotations

import os
import sys

from harness._native.transport import Link, floor_sock_serve


def main(argv: list[str]) -> int:
    mode, kind_or_fd, *rest = argv
    if mode == "frame":
        link = (Link.shm_open(rest[0], 1, name="echo") if kind_or_fd == "shm"
                else Link.from_fd(int(rest[0]), name="echo"))
        if len(rest) == 3:
            link.set_model(int(rest[1]), int(rest[2]))
        link.echo_serve()
        return 0
    fd = int(kind_or_fd)
    os.write(fd, b"R")  # ready: the client starts its clock after this
    floor_sock_serve(fd, int(rest[0]), mode == "raw-echo")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
