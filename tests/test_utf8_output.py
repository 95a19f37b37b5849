"""Non-ASCII child output on every live feed (§4 OutputRing, §8 Process,
§11 /streams and /wstreams).

A child's pipe is read in pieces of whatever the pipe holds, which cuts
multi-byte characters in two. The daemon holds back the start of a cut
character until its end arrives, so an HTTP chunk, an SSE event and a
websocket frame always decode on their own: valid UTF-8 goes out as
websocket text frames and without U+FFFD on event streams. Bytes that are
not UTF-8 at all (a hostile or binary child) are passed on unchanged: a
binary websocket frame, raw bytes on longpoll/continuous, and U+FFFD only
for those bytes on an event stream, which can carry text only.
"""
import os
import socket
import time

import gafferd as g
from conftest import PY, SSEParser, StreamReply, script, section, sse_until, wait_for
from test_websocket import BINARY, TEXT, WSClient

EURO = "\u20ac"
BIG = (EURO * 100000 + "\n").encode("utf-8")          # 300,001 bytes in one write(2)

# emitter.py: obeys commands on stdin, one write(2) each:
#   big -> 100,000 euro signs and a newline     bad -> b"ok \xff\xfe\n"
#   cut -> b"abc\xe2" (the start of a euro sign, and nothing more)
EMITTER = r'''
import os, sys
while True:
    line = sys.stdin.buffer.readline()
    if not line:
        break
    cmd = line.strip()
    if cmd == b"big":
        os.write(1, ("\u20ac" * 100000 + "\n").encode("utf-8"))
    elif cmd == b"bad":
        os.write(1, b"ok \xff\xfe\n")
    elif cmd == b"cut":
        os.write(1, b"abc\xe2")
'''


def emitter(tmp_path, **keys):
    keys.setdefault("redirect_output", "stdout, stderr")
    keys.setdefault("redirect_input", "true")
    return section("emit", PY, "-u " + script(tmp_path, "emitter.py", EMITTER), **keys)


def first_id(d):
    return wait_for(lambda: d.pids("emit"), message="a live emit process")[0]


def command(d, pid, text):
    r = d.post("/streams/%d/stdin" % pid, body=text.encode() + b"\n")
    assert r.status == 200, r


class RawChunks:
    """A chunked reply read on a raw socket, keeping each chunk as sent."""

    def __init__(self, port, path):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                           % (path, port)).encode())
        self.raw, self.chunks = b"", []
        while b"\r\n\r\n" not in self.raw:
            self._fill(time.monotonic() + 10)
        head, _, self.raw = self.raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head

    def _fill(self, deadline):
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = self.sock.recv(1 << 20)
        assert data, "connection closed"
        self.raw += data

    def until(self, total, timeout=20.0):
        deadline = time.monotonic() + timeout
        while sum(map(len, self.chunks)) < total:
            size, sep, rest = self.raw.partition(b"\r\n")
            if sep and len(rest) >= int(size, 16) + 2:
                n = int(size, 16)
                self.chunks.append(rest[:n])
                self.raw = rest[n + 2:]
                continue
            assert time.monotonic() < deadline, "only %d bytes" % sum(map(len, self.chunks))
            self._fill(deadline)
        return self.chunks

    def close(self):
        self.sock.close()


# -- pure parts ------------------------------------------------------------------

def test_partial_tail_finds_only_a_real_beginning():
    euro = EURO.encode()
    assert g.utf8_partial_tail(b"") == 0
    assert g.utf8_partial_tail(b"abc") == 0
    assert g.utf8_partial_tail(b"a" + euro) == 0
    assert g.utf8_partial_tail(b"a" + euro[:1]) == 1
    assert g.utf8_partial_tail(b"a" + euro[:2]) == 2
    smile = "\U0001f600".encode()
    assert [g.utf8_partial_tail(smile[:n]) for n in range(5)] == [0, 1, 2, 3, 0]
    # bytes that never start a character are not waited for
    assert g.utf8_partial_tail(b"\xff") == 0
    assert g.utf8_partial_tail(b"\xc0") == 0
    assert g.utf8_partial_tail(b"\x80\x80\x80") == 0


def test_ring_drops_cut_characters_at_its_old_end():
    ring = g.OutputRing(1000)
    for _ in range(50):
        ring.append((EURO * 97).encode())        # 291 bytes: the cut moves every time
        bytes(ring.buf).decode("utf-8")
        assert len(ring.buf) <= 1000
        assert ring.start == ring.total - len(ring.buf)
    ring.append(BIG)                               # more than the ring at once
    assert bytes(ring.buf).decode("utf-8") == EURO * 333 + "\n"
    # an offset inside a character (no id handed out is one) starts at the next
    assert ring.since(ring.total - 5) == (EURO + "\n").encode()
    assert ring.since(ring.total - 4) == (EURO + "\n").encode()


# -- the daemon ------------------------------------------------------------------

def test_100000_euro_signs_arrive_whole_on_every_feed(gafferd, tmp_path):
    d = gafferd(emitter(tmp_path))
    pid = first_id(d)
    ws = WSClient(d.port, "/wstreams/%d" % pid)
    assert ws.status == 101
    sse = StreamReply(d.port, "/streams/%d/stdout?feed=eventsource&heartbeat=0" % pid)
    sse.read_headers(5.0)
    raw = RawChunks(d.port, "/streams/%d/stdout?feed=continuous&heartbeat=0" % pid)
    try:
        command(d, pid, "big")
        # websocket: text frames only, each valid UTF-8 on its own
        kinds = ws.collect(BIG, timeout=20.0)
        assert set(kinds) == {TEXT}, kinds
        # event stream: no replacement character, ids on character boundaries
        parser = SSEParser()
        expected = EURO * 100000

        def joined(p):
            return "".join(line.decode("utf-8") for e in p.events for line in e.data)
        sse_until(sse, parser, lambda p: len(joined(p)) >= len(expected), 20.0, "the euro signs")
        assert joined(parser) == expected
        assert "\ufffd" not in joined(parser)
        assert all(int(e.id) % 3 in (0, 1) for e in parser.events), [e.id for e in parser.events]
        assert len(parser.events) > 1          # the pipe did cut the write in pieces
        # continuous: every HTTP chunk decodes alone
        chunks = raw.until(len(BIG))
        assert b"".join(chunks) == BIG
        for piece in chunks:
            piece.decode("utf-8")
        assert len(chunks) > 1
        # /_log and a resume from a ring that overwrote its start decode cleanly
        lines = d.json("GET", "/processes/emit/_log?lines=5")["lines"]
        assert lines and set(lines[-1]) == {EURO}
        again = StreamReply(d.port, "/streams/%d/stdout?feed=eventsource&heartbeat=0"
                            "&last_event_id=1" % pid)
        try:
            p2 = SSEParser()
            sse_until(again, p2, lambda p: p.events, 10.0, "the backlog")
            text = "".join(line.decode("utf-8") for line in p2.events[0].data)
            assert text and set(text) == {EURO}, text[:20]
        finally:
            again.close()
    finally:
        ws.close()
        sse.close()
        raw.close()


def test_invalid_bytes_pass_unchanged_and_a_cut_character_is_not_held_for_ever(gafferd, tmp_path):
    d = gafferd(emitter(tmp_path))
    pid = first_id(d)
    ws = WSClient(d.port, "/wstreams/%d" % pid)
    assert ws.status == 101
    sse = StreamReply(d.port, "/streams/%d/stdout?feed=eventsource&heartbeat=0" % pid)
    sse.read_headers(5.0)
    try:
        parser = SSEParser()
        command(d, pid, "bad")
        assert ws.collect(b"ok \xff\xfe\n") == [BINARY]      # the exact bytes
        sse_until(sse, parser, lambda p: p.events, 5.0, "the bad line")
        assert parser.events[0].data == ["ok \ufffd\ufffd".encode()]
        # a child that stops in the middle of a character: its start waits
        # a moment for the rest, then goes out as it is
        command(d, pid, "cut")
        assert ws.collect(b"abc\xe2", timeout=5.0) == [TEXT, BINARY]
        sse_until(sse, parser, lambda p: len(p.events) >= 3, 5.0, "the cut character")
        assert [e.data for e in parser.events[1:]] == [[b"abc"], ["\ufffd".encode()]]
        # the stream offsets still count every byte
        assert int(parser.events[-1].id) == len(b"ok \xff\xfe\nabc\xe2")
    finally:
        ws.close()
        sse.close()


def test_a_character_cut_at_exit_is_flushed(gafferd, tmp_path):
    path = script(tmp_path, "last.py", "import os\nos.write(1, b'end\\xe2\\x82')\n")
    d = gafferd(section("last", PY, path, redirect_output="stdout"))
    wait_for(lambda: d.json("GET", "/processes/last/_log?lines=1").get("lines") == ["end\ufffd"],
             10.0, message="the last bytes in the ring")
