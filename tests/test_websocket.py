"""The /wstreams/ID websocket (RFC 6455).

The client below is written with the stdlib only: the opening handshake
with ``Sec-WebSocket-Key``, masked client frames, fragmentation, control
frames and the close handshake. It checks what the daemon sends just as
strictly (server frames unmasked, reserved bits clear, close codes).
"""
import base64
import hashlib
import json
import os
import signal
import socket
import struct
import time

import pytest

from conftest import script, section, EXAMPLES, PY, open_fds, settled_fds, wait_for

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10

# talker.py: obeys commands on stdin, one write(2) each:
#   say TEXT -> TEXT\n on stdout   err TEXT -> TEXT\n on stderr
#   bin -> b"\xff\xfe\xfd\n" on stdout
TALKER = r'''
import os, sys
while True:
    line = sys.stdin.buffer.readline()
    if not line:
        break
    cmd, _, arg = line.rstrip(b"\n").partition(b" ")
    if cmd == b"say":
        os.write(1, arg + b"\n")
    elif cmd == b"err":
        os.write(2, arg + b"\n")
    elif cmd == b"bin":
        os.write(1, b"\xff\xfe\xfd\n")
'''

TICKER = r'''
import os, time
while True:
    os.write(1, b"tick\n")
    time.sleep(0.05)
'''


class WSClient:
    """A minimal, strict RFC 6455 client on a raw socket."""

    def __init__(self, port, path, origin=None, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16))
        lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1:%d" % port,
                 "Upgrade: websocket", "Connection: Upgrade",
                 "Sec-WebSocket-Key: %s" % key.decode(), "Sec-WebSocket-Version: 13"]
        if origin:
            lines.append("Origin: %s" % origin)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buf = b""
        self.eof = False
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if not self._fill(deadline):
                raise AssertionError("connection closed during the handshake: %r" % self.buf)
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.status == 101:
            assert self.headers.get("upgrade", "").lower() == "websocket", self.headers
            assert "upgrade" in self.headers.get("connection", "").lower(), self.headers
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
            assert self.headers.get("sec-websocket-accept") == accept, self.headers

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no websocket data in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no websocket data in time")
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def send_frame(self, opcode, payload=b"", fin=True, mask=True):
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        head = bytes([(0x80 if fin else 0) | opcode])
        bit = 0x80 if mask else 0
        n = len(payload)
        if n < 126:
            head += bytes([bit | n])
        elif n < 65536:
            head += bytes([bit | 126]) + struct.pack("!H", n)
        else:
            head += bytes([bit | 127]) + struct.pack("!Q", n)
        if mask:
            key = os.urandom(4)
            payload = key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + payload)

    def send_text(self, text):
        self.send_frame(TEXT, text)

    def recv_frame(self, timeout=5.0):
        """(fin, opcode, payload) of the next frame; None at end of stream."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            if self.eof or not self._fill(deadline):
                assert not self.buf, "connection closed inside a frame: %r" % self.buf[:50]
                return None

    def _parse(self):
        buf = self.buf
        if len(buf) < 2:
            return None
        assert buf[0] & 0x70 == 0, "reserved bits set in a server frame"
        assert buf[1] & 0x80 == 0, "server frames must not be masked (RFC 6455 5.1)"
        fin, opcode, n, pos = bool(buf[0] & 0x80), buf[0] & 0x0F, buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, pos = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, pos = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < pos + n:
            return None
        self.buf = buf[pos + n:]
        assert opcode in (CONT, TEXT, BINARY, CLOSE, PING, PONG), opcode
        if opcode >= CLOSE:
            assert fin and n <= 125, "bad control frame"
        return fin, opcode, buf[pos:pos + n]

    def recv_message(self, timeout=5.0):
        """(opcode, payload) of the next message, fragments joined; control
        frames are returned as they come; None at end of stream."""
        deadline = time.monotonic() + timeout
        opcode, parts = None, []
        while True:
            frame = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if frame is None:
                assert opcode is None, "stream ended inside a fragmented message"
                return None
            fin, op, payload = frame
            if op >= CLOSE:
                return op, payload
            if opcode is None:
                assert op in (TEXT, BINARY), "continuation without a first frame"
                opcode = op
            else:
                assert op == CONT, "new message inside a fragmented one"
            parts.append(payload)
            if fin:
                data = b"".join(parts)
                if opcode == TEXT:
                    data.decode("utf-8")  # must be valid UTF-8
                return opcode, data

    def collect(self, want, timeout=5.0):
        """Read data messages until their payloads joined equal ``want``."""
        deadline = time.monotonic() + timeout
        got, kinds = b"", []
        while got != want:
            assert want.startswith(got), "unexpected data %r (want %r)" % (got, want)
            msg = self.recv_message(max(0.0, deadline - time.monotonic()))
            assert msg is not None, "closed before %r; got %r" % (want, got)
            assert msg[0] in (TEXT, BINARY), "unexpected control frame %r" % (msg,)
            kinds.append(msg[0])
            got += msg[1]
        return kinds

    def expect_close(self, timeout=5.0):
        """Skip data messages up to the server's close frame, then EOF; return
        (data seen, close payload)."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            msg = self.recv_message(max(0.0, deadline - time.monotonic()))
            assert msg is not None, "TCP closed without a close frame"
            if msg[0] == CLOSE:
                break
            seen.append(msg)
        payload = msg[1]
        if payload:
            assert len(payload) >= 2, "bad close payload"
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:  # the server closes the TCP connection after the close frame
            rest = self.buf + self.sock.recv(65536)
            assert rest == b"", "data after the close frame: %r" % rest[:100]
        except ConnectionResetError:
            pass
        except socket.timeout:
            pytest.fail("the daemon kept the TCP connection open after its close frame")
        return seen, payload

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def close_code(payload):
    return struct.unpack("!H", payload[:2])[0] if payload else None


ECHO = section("echo", PY, "-u " + os.path.join(EXAMPLES, "echo.py"),
               redirect_output="stdout, stderr", redirect_input="true")


def first_id(d, name):
    return wait_for(lambda: d.pids(name), message="a live %s process" % name)[0]


def connect(d, pid, **kw):
    ws = WSClient(d.port, "/wstreams/%d" % pid, **kw)
    assert ws.status == 101, (ws.status, ws.buf)
    return ws


def test_echo_round_trip(gafferd):
    d = gafferd(ECHO)
    ws = connect(d, first_id(d, "echo"))
    try:
        ws.send_text("ECHO\n")
        assert set(ws.collect(b"ECHO\n\n")) == {TEXT}
        ws.send_frame(BINARY, b"bytes too\n")
        ws.collect(b"bytes too\n\n")
    finally:
        ws.close()


def test_long_messages_use_16_and_64_bit_lengths(gafferd):
    d = gafferd(ECHO)
    ws = connect(d, first_id(d, "echo"))
    try:
        for size in (200, 70000):
            line = b"%d" % size + b"x" * size + b"\n"
            ws.send_frame(TEXT, line)
            ws.collect(line + b"\n", 10.0)
    finally:
        ws.close()


def test_fragmented_message_with_a_ping_in_the_middle(gafferd):
    d = gafferd(ECHO)
    ws = connect(d, first_id(d, "echo"))
    try:
        ws.send_frame(TEXT, "EC", fin=False)
        ws.send_frame(CONT, "H", fin=False)
        ws.send_frame(PING, b"mid")  # control frames may come between fragments
        ws.send_frame(CONT, "O\n", fin=True)
        assert ws.recv_message() == (PONG, b"mid")
        ws.collect(b"ECHO\n\n")
    finally:
        ws.close()


def test_ping_gets_a_pong_with_the_same_payload(gafferd):
    d = gafferd(ECHO)
    ws = connect(d, first_id(d, "echo"))
    try:
        for payload in (b"", b"hello", os.urandom(125)):
            ws.send_frame(PING, payload)
            assert ws.recv_message() == (PONG, payload)
    finally:
        ws.close()


def test_text_for_utf8_binary_otherwise_and_every_label(gafferd, tmp_path):
    d = gafferd(section("talk", PY, "-u " + script(tmp_path, "talker.py", TALKER),
                        redirect_output="stdout, stderr", redirect_input="true"))
    ws = connect(d, first_id(d, "talk"))
    try:
        ws.send_text("say h\u00e9llo\n")
        assert ws.collect("h\u00e9llo\n".encode()) == [TEXT]
        ws.send_text("bin\n")
        assert ws.collect(b"\xff\xfe\xfd\n") == [BINARY]
        ws.send_text("err on stderr\n")  # the second label is forwarded too
        ws.collect(b"on stderr\n")
    finally:
        ws.close()


def test_several_clients_all_get_the_output(gafferd):
    d = gafferd(ECHO)
    pid = first_id(d, "echo")
    clients = [connect(d, pid) for _ in range(3)]
    try:
        clients[0].send_text("from zero\n")
        for ws in clients:
            ws.collect(b"from zero\n\n")
        clients[2].send_text("from two\n")
        for ws in clients:
            ws.collect(b"from two\n\n")
    finally:
        for ws in clients:
            ws.close()


def test_close_handshake_and_cleanup(gafferd):
    d = gafferd(ECHO)
    pid = first_id(d, "echo")
    baseline = settled_fds(d.pid)
    ws = connect(d, pid)
    try:
        ws.send_frame(CLOSE, struct.pack("!H", 1000) + b"bye")
        seen, payload = ws.expect_close()
        assert seen == []
        assert close_code(payload) in (None, 1000), payload
    finally:
        ws.close()
    wait_for(lambda: open_fds(d.pid) <= baseline, 5.0, message="fd count back to baseline")
    # the process is still served after one client left
    ws = connect(d, pid)
    try:
        ws.send_text("again\n")
        ws.collect(b"again\n\n")
    finally:
        ws.close()


def test_unmasked_client_frame_is_a_protocol_error(gafferd):
    d = gafferd(ECHO)
    ws = connect(d, first_id(d, "echo"))
    try:
        ws.send_frame(TEXT, "ECHO\n", mask=False)
        # RFC 6455 5.1: the server MUST close the connection and MAY first
        # send a close frame with status 1002; it must not act on the frame.
        while True:
            msg = ws.recv_message()
            if msg is None:
                break
            assert msg[0] == CLOSE, "the unmasked frame was acted upon: %r" % (msg,)
            assert close_code(msg[1]) == 1002, msg
            assert ws.recv_frame() is None
            break
    finally:
        ws.close()


def test_server_closes_when_the_process_exits(gafferd):
    d = gafferd(ECHO)
    pid = first_id(d, "echo")
    ws = connect(d, pid)
    try:
        ws.send_text("last\n")
        ws.collect(b"last\n\n")
        os.kill(d.os_pid(pid), signal.SIGTERM)
        seen, payload = ws.expect_close(10.0)
        assert seen == []
    finally:
        ws.close()


def test_unknown_process_gets_not_found_then_close(gafferd):
    d = gafferd(ECHO)
    first_id(d, "echo")
    ws = connect(d, 999)
    try:
        seen, payload = ws.expect_close()
        assert [(op, json.loads(data.decode())) for op, data in seen] == \
            [(TEXT, {"error": "not_found"})]
    finally:
        ws.close()


def test_process_without_redirect_input_gets_forbidden_write_then_close(gafferd, tmp_path):
    d = gafferd(section("tick", PY, "-u " + script(tmp_path, "ticker.py", TICKER),
                        redirect_output="stdout"))
    ws = connect(d, first_id(d, "tick"))
    try:
        seen, payload = ws.expect_close()
        errors = [json.loads(data.decode()) for op, data in seen if data.startswith(b"{")]
        assert errors == [{"error": "forbidden_write"}], seen
    finally:
        ws.close()


def test_foreign_origin_is_refused_own_origin_accepted(gafferd):
    d = gafferd(ECHO)
    pid = first_id(d, "echo")
    ws = WSClient(d.port, "/wstreams/%d" % pid, origin="http://evil.example")
    try:
        assert ws.status == 403, ws.status
    finally:
        ws.close()
    ws = connect(d, pid, origin="http://127.0.0.1:%d" % d.port)
    try:
        ws.send_text("mine\n")
        ws.collect(b"mine\n\n")
    finally:
        ws.close()
