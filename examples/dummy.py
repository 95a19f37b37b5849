#!/usr/bin/env python3
"""A steady source of output for trying gafferd out.

Prints a greeting with its pid, dumps its environment (``KEY=value``
lines, sorted), then every 0.1 s writes ``STDOUTi <n>`` to stdout and
``STDERR <n>`` to stderr, flushing each line. It exits with status 0 at
once on SIGTERM, SIGINT or SIGQUIT, and when its output pipe is closed.
"""
import os
import signal
import sys
import time


def quit_now(signum, frame):
    # os._exit: exit at once, even in the middle of a write; every line
    # is flushed as soon as it is written, so nothing is lost.
    os._exit(0)


def say(stream, line):
    stream.write(line + "\n")
    stream.flush()


def main():
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, quit_now)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        say(sys.stdout, "hello, dummy here (pid %d)" % os.getpid())
        for key in sorted(os.environ):
            say(sys.stdout, "%s=%s" % (key, os.environ[key]))
        n = 0
        while True:
            say(sys.stdout, "STDOUTi %d" % n)
            say(sys.stderr, "STDERR %d" % n)
            n += 1
            time.sleep(0.1)
    except BrokenPipeError:
        # Whoever read our output has gone (the daemon died): stop quietly.
        os._exit(0)


if __name__ == "__main__":
    main()
