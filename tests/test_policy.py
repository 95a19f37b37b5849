"""§1, §3 and §4 pure helpers: the gaffer 0.4.4 flapping key and its mapping,
output rings, sizes, signal and heartbeat parsing."""
from __future__ import annotations

import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gafferd  # noqa: E402
from gafferd import Flapping  # noqa: E402


def test_flapping_of_gaffer_0_4_4_maps_onto_the_per_process_keys():
    # flapping = attempts, window, retry_in, max_retry: an exit within
    # window is a failed start, waits retry_in, max_retry of them are retried
    spec = gafferd.build_spec("w", sys.executable, {"flapping": "2, 5., 0.5, 3"},
                              base_dir="/", origin="api")
    assert spec.startsecs == 5.0 and spec.start_retries == 3
    assert spec.backoff.to_list() == [0.5, 1.0, 0.5]
    # keys the template sets itself win; off keeps the default backoff
    spec = gafferd.build_spec("w", sys.executable, {"flapping": "2, 5., 0.5, 3",
                                                    "startsecs": "2"}, base_dir="/", origin="api")
    assert spec.startsecs == 2.0
    spec = gafferd.build_spec("w", sys.executable, {"flapping": "off"}, base_dir="/",
                              origin="api")
    assert spec.backoff == gafferd.Backoff() and spec.start_retries is None
    assert spec.startsecs == 1.0


@pytest.mark.parametrize("text,expected", [
    ("2, 1., 7., 5", (2, 1.0, 7.0, 5)),
    ("2 1 7 5", (2, 1.0, 7.0, 5)),
    ("3", (3, 1.0, 7.0, 5)),
    ("3, 0.5", (3, 0.5, 7.0, 5)),
    ({"attempts": 4, "retry_in": 2}, (4, 1.0, 2.0, 5)),
    (True, (2, 1.0, 7.0, 5)),
])
def test_flapping_parse(text, expected):
    f = Flapping.parse(text)
    assert (f.attempts, f.window, f.retry_in, f.max_retry) == expected


@pytest.mark.parametrize("text", ["off", "OFF", "false", "no", False])
def test_flapping_off(text):
    assert Flapping.parse(text) is None


@pytest.mark.parametrize("text", ["1 2 3 4 5", "x", "2, y", "-1", "2.5", {"bogus": 1}])
def test_flapping_rejects(text):
    with pytest.raises(ValueError):
        Flapping.parse(text)


def test_output_ring_keeps_the_tail_and_offsets():
    ring = gafferd.OutputRing(10)
    ring.append(b"0123456")
    ring.append(b"789abc")
    assert bytes(ring.buf) == b"3456789abc"
    assert ring.total == 13 and ring.start == 3
    assert ring.since(5) == b"56789abc"
    assert ring.since(2) is None
    assert ring.since(13) == b""
    ring.append(b"X" * 25)
    assert bytes(ring.buf) == b"X" * 10 and ring.total == 38


def test_output_ring_tail_lines():
    ring = gafferd.OutputRing(100)
    ring.append(b"a\nb\nc\n")
    assert ring.tail(2) == b"b\nc\n"
    assert ring.tail(10) == b"a\nb\nc\n"
    ring.append(b"partial")
    assert ring.tail(2) == b"c\npartial"
    assert ring.tail(0) == b""
    assert gafferd.split_lines(b"x\ny\n") == ["x", "y"]


@pytest.mark.parametrize("value,expected", [
    ("64KB", 65536), ("1 MB", 1 << 20), ("10", 10), ("2g", 2 << 30), (5, 5)])
def test_parse_size(value, expected):
    assert gafferd.parse_size(value) == expected


@pytest.mark.parametrize("value", ["ten", "5 TB", "-1", "1.5MB"])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError):
        gafferd.parse_size(value)


def test_human_size_and_ctime():
    assert gafferd.human_size(4534272) == "4M"
    assert gafferd.human_size(512) == "512B"
    assert gafferd.human_size(1024) == "1K"
    assert gafferd.format_ctime(0.3) == "0:00.30"
    assert gafferd.format_ctime(0.03) == "0:00.03"
    assert gafferd.format_ctime(3725.5) == "62:05.50"


@pytest.mark.parametrize("text,number", [("15", 15), ("HUP", signal.SIGHUP),
                                         ("sigterm", signal.SIGTERM), ("KILL", 9)])
def test_parse_signal(text, number):
    assert gafferd.parse_signal(text) == number


@pytest.mark.parametrize("text,code", [(None, "no_signal_number"), ("", "no_signal_number"),
                                       ("x", "bad_value"), ("999", "bad_value"),
                                       ("0", "bad_value")])
def test_parse_signal_errors(text, code):
    with pytest.raises(gafferd.ApiError) as info:
        gafferd.parse_signal(text)
    assert info.value.status == 400 and info.value.code == code


@pytest.mark.parametrize("value,expected", [(None, 60.0), ("true", 60.0), ("false", None),
                                            ("0", None), ("", None), ("2", 2.0)])
def test_parse_heartbeat(value, expected):
    assert gafferd.parse_heartbeat(value) == expected


def test_summarize_stats_na_when_empty():
    out = gafferd.summarize_stats("x", [])
    assert out["mem"] == out["max_mem"] == out["min_cpu"] == "N/A"
    out = gafferd.summarize_stats("x", [{"mem": 1.0, "cpu": 2.0}, {"mem": 0.5, "cpu": 0.0}])
    assert (out["mem"], out["max_mem"], out["min_mem"], out["cpu"]) == (1.5, 1.0, 0.5, 2.0)


@pytest.mark.parametrize("text,kind,host,port", [
    ("127.0.0.1:5000", "tcp", "127.0.0.1", 5000),
    ("[::1]:80", "tcp", "::1", 80),
    ("localhost", "tcp", "localhost", 8000),
    ("", "tcp", "0.0.0.0", 8000),
    ("unix:/tmp/g.sock", "unix", None, None),
])
def test_address_parse(text, kind, host, port):
    a = gafferd.Address.parse(text)
    assert (a.kind, a.host, a.port) == (kind, host, port)


@pytest.mark.parametrize("text", ["host:http", "1:2:3", "host:70000", "unix:"])
def test_address_rejects(text):
    with pytest.raises(ValueError):
        gafferd.Address.parse(text)


def test_token_matches_bearer_and_basic():
    import base64
    assert gafferd.token_matches("Bearer s3cret", "s3cret")
    assert gafferd.token_matches("Basic " + base64.b64encode(b":s3cret").decode(), "s3cret")
    assert not gafferd.token_matches("Bearer nope", "s3cret")
    assert not gafferd.token_matches("", "s3cret")
    assert not gafferd.token_matches("Basic !!!", "s3cret")
