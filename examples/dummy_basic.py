#!/usr/bin/env python3
"""The quietest possible supervised program.

Prints a greeting with its pid, then idles until SIGTERM, SIGINT or
SIGQUIT, on which it exits with status 0.
"""
import os
import signal
import sys


def quit_now(signum, frame):
    os._exit(0)


def main():
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, quit_now)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        sys.stdout.write("hello, dummy_basic here (pid %d)\n" % os.getpid())
        sys.stdout.flush()
    except BrokenPipeError:
        os._exit(0)
    while True:
        signal.pause()  # sleeps until a signal arrives; no polling


if __name__ == "__main__":
    main()
