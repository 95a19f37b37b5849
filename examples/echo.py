#!/usr/bin/env python3
"""Echo stdin back to stdout, one line at a time.

Each line read is written back the way ``print(line)`` would, so the
line keeps its own newline and gets one more: ``ECHO\\n`` comes back as
``ECHO\\n\\n``. Output is flushed after every line. The script exits
with status 0 at end of input (so it never spins when stdin is
``/dev/null``) and at once on SIGTERM, SIGINT or SIGQUIT.

Run it under gafferd with ``redirect_input = true`` and
``redirect_output = stdout, stderr``, then write to it with
``POST /streams/<id>/stdin`` or the ``/wstreams/<id>`` websocket.
"""
import os
import signal
import sys


def quit_now(signum, frame):
    os._exit(0)


def main():
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, quit_now)
    # Bytes, not text: any input comes back unchanged, even invalid UTF-8.
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        while True:
            line = stdin.readline()
            if not line:  # end of input
                break
            stdout.write(line + b"\n")  # what print(line) writes
            stdout.flush()
    except BrokenPipeError:
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
