"""Event feeds: GET /watch[/p1[/p2[/p3]]] and the stats feeds
(GET /stats/NAME and /stats/NAME/ID).

Replies are read on raw sockets as they arrive (``conftest.StreamReply``);
event-stream replies go through the strict ``conftest.SSEParser``.
"""
import json
import os
import re
import signal
import time
import urllib.parse

import pytest

from conftest import (SSEParser, StreamReply, open_fds, section, settled_fds, sse_until,
                      wait_for)

KEYS = {"pid", "id", "name", "cpu", "mem", "mem_info1", "mem_info2", "ctime",
        "username", "nice", "cmdline", "children"}


def open_stream(d, path):
    s = StreamReply(d.port, path)
    s.read_headers(5.0)
    assert s.status == 200, (s.status, s.read_to_end(5))
    assert s.headers["cache-control"] == "no-cache", s.headers
    return s


def json_lines(body):
    """The JSON objects of a continuous reply; blank lines are heartbeats.
    Every object must be on one line ending with CRLF, as gaffer 0.4.4 wrote them."""
    assert re.fullmatch(rb"(\{[^\r\n]*\}\r\n|\r?\n)*(\{[^\r\n]*)?", body), body[-300:]
    return [json.loads(line) for line in body.split(b"\r\n")[:-1] if line.strip()]


def watch(d, pattern, query="feed=continuous&heartbeat=0"):
    return open_stream(d, "/watch%s?%s" % ("/" + pattern if pattern else "", query))


def events_until(s, count, timeout=10.0):
    """The first ``count`` events of a continuous reply (waits for them)."""
    body = s.read_until(lambda b: len(json_lines(b)) >= count, timeout,
                        "%d events" % count)
    return json_lines(body)


def names(events):
    return [e["event"] for e in events]


# startsecs = 600: the process is "starting" (never "running" or ready)
# for the whole test, so the state events come in a fixed order
# the template is starting before its process is spawned (off the loop)
START_STOP = ["start", "proc.w.start", "state", "proc.w.state", "spawn", "proc.w.spawn",
              "stop", "proc.w.stop", "stop_pid", "proc.w.stop_pid", "state", "proc.w.state",
              "exit", "proc.w.exit"]
N_START = 6                 # the events of a start
W = section("w", "sleep", "600", start="false", startsecs="600")


def start_then_stop(d, all_events):
    """Start and stop template w; ``all_events`` is a /watch continuous reply."""
    assert d.post("/processes/w/_start").status == 200
    events_until(all_events, N_START)
    assert d.post("/processes/w/_stop").status == 200
    return events_until(all_events, len(START_STOP))


# -- /watch -------------------------------------------------------------------

def test_longpoll_sends_one_event_then_ends(gafferd):
    d = gafferd(section("blink", "sleep", "0.1", flapping="off"))
    for path, expect in (("/watch/proc/blink/spawn?feed=longpoll", "proc.blink.spawn"),
                         ("/watch/spawn", "spawn"),
                         ("/watch?feed=longpoll&heartbeat=1", None),
                         ("/watch/proc/blink/exit?feed=nonsense", "proc.blink.exit")):
        s = StreamReply(d.port, path)
        try:
            body = s.read_to_end(5.0)
            assert s.status == 200, (path, s.status, body)
            assert s.headers["content-type"].startswith("application/json"), s.headers
            assert re.fullmatch(rb"\{[^\r\n]*\}\r\n", body), (path, body)
            event = json.loads(body)
            assert event["name"] == "blink"
            assert event["event"] == expect or (expect is None and event["event"] in (
                "spawn", "proc.blink.spawn", "exit", "proc.blink.exit"))
            if event["event"].endswith("spawn"):
                assert set(event) == {"event", "name", "pid", "detached", "os_pid"}
        finally:
            s.close()


def test_continuous_patterns_get_exactly_their_events_in_order(gafferd):
    d = gafferd(W)
    patterns = ["", "spawn", "proc/w", "proc/w/exit", "proc/w/stop_pid", "create",
                "proc/other", "proc"]
    feeds = {p: watch(d, p) for p in patterns}
    try:
        got = start_then_stop(d, feeds[""])
        assert names(got) == START_STOP
        body = {"name": "c", "cmd": "sleep", "args": "600", "start": False}
        assert d.post("/processes", body=json.dumps(body)).status == 200
        got = events_until(feeds[""], len(START_STOP) + 1)
        assert names(got) == START_STOP + ["create"]
        want = {
            "spawn": ["spawn"],
            "proc/w": [e for e in START_STOP if e.startswith("proc.w.")],
            "proc/w/exit": ["proc.w.exit"],
            "proc/w/stop_pid": ["proc.w.stop_pid"],
            "create": ["create"],
            "proc": [e for e in START_STOP if e.startswith("proc.")],  # once each
        }
        for pattern, expected in want.items():
            events = events_until(feeds[pattern], len(expected))
            assert names(events) == expected, pattern
        # same payloads everywhere, apart from the event name
        spawn = got[START_STOP.index("spawn")]
        assert set(spawn) == {"event", "name", "pid", "detached", "os_pid"}
        assert spawn["name"] == "w" and spawn["detached"] is False
        assert dict(got[START_STOP.index("proc.w.spawn")], event="spawn") == spawn
        exit_ = got[START_STOP.index("exit")]
        assert set(exit_) == {"event", "name", "pid", "exit_status", "term_signal", "os_pid",
                              "uptime", "restart_in"}
        assert (exit_["pid"], exit_["os_pid"]) == (spawn["pid"], spawn["os_pid"])
        assert exit_["term_signal"] == signal.SIGTERM
        # continuous replies stay open: more events keep coming on them
        assert d.post("/processes/w/_start").status == 200
        more = events_until(feeds[""], len(START_STOP) + 3)
        assert names(more)[len(START_STOP) + 1:][:2] == ["start", "proc.w.start"]
        assert names(events_until(feeds["spawn"], 2)) == ["spawn", "spawn"]
        with pytest.raises(TimeoutError):  # nothing ever matched proc.other
            feeds["proc/other"].read(0.1)
    finally:
        for s in feeds.values():
            s.close()


def test_eventsource_is_valid_sse(gafferd):
    d = gafferd(W)
    es = watch(d, "", "feed=eventsource&heartbeat=0")
    proc = watch(d, "proc/w", "feed=eventsource")
    all_events = watch(d, "")
    parser, proc_parser = SSEParser(), SSEParser()
    try:
        assert es.headers["content-type"].startswith("text/event-stream"), es.headers
        start_then_stop(d, all_events)
        sse_until(es, parser, lambda p: len(p.events) >= len(START_STOP), 5.0, "all events")
        assert [e.event for e in parser.events] == START_STOP
        for event in parser.events:
            assert len(event.data) == 1, event
            payload = json.loads(event.data[0])
            assert payload["event"] == event.event and payload["name"] == "w"
        # the exact framing of the contract: id, event, data, blank line, CRLF
        assert re.fullmatch(rb"(id: [0-9]+\r\nevent: [^\r\n]+\r\ndata: \{[^\r\n]*\}\r\n\r\n)+",
                            bytes(es.body)), bytes(es.body[:300])
        # ids count the daemon's events: consecutive here, shared by every feed
        ids = [int(e.id) for e in parser.events]
        assert ids == list(range(ids[0], ids[0] + len(ids))), ids
        sse_until(proc, proc_parser, lambda p: len(p.events) >= len(START_STOP) // 2, 5.0,
                  "proc.w events")
        assert [e.event for e in proc_parser.events] == \
            [e for e in START_STOP if e.startswith("proc.w.")]
        assert [int(e.id) for e in proc_parser.events] == \
            [int(e.id) for e in parser.events if e.event.startswith("proc.w.")]
        assert parser.idle and proc_parser.idle
    finally:
        for s in (es, proc, all_events):
            s.close()


def test_eventsource_resumes_from_last_event_id_without_gap_or_repeat(gafferd):
    d = gafferd(W)
    first = watch(d, "", "feed=eventsource&heartbeat=0")
    parser = SSEParser()
    all_events = watch(d, "")
    try:
        assert d.post("/processes/w/_start").status == 200
        sse_until(first, parser, lambda p: len(p.events) >= N_START, 5.0, "the start events")
        events_until(all_events, N_START)
    finally:
        first.close()                          # the client loses its feed here
    seen = parser.events[:N_START]
    away = len(START_STOP) - N_START
    try:
        assert d.post("/processes/w/_stop").status == 200   # 6 events while away
        events_until(all_events, len(START_STOP))
    finally:
        all_events.close()
    # an EventSource reconnects with the header; the query parameter works too
    for how in ("header", "query"):
        path = "/watch?feed=eventsource&heartbeat=0"
        if how == "query":
            path += "&last_event_id=%s" % seen[-1].id
        s = StreamReply(d.port, path, headers={"Last-Event-ID": seen[-1].id}
                        if how == "header" else None)
        s.read_headers(5.0)
        assert s.status == 200
        p2 = SSEParser()
        # the second pass also replays the first pass's own start and stop
        replayed = away + (len(START_STOP) if how == "query" else 0)
        try:
            sse_until(s, p2, lambda p: len(p.events) >= replayed, 5.0, "the missed events")
            assert [e.event for e in seen + p2.events[:away]] == START_STOP
            assert [e.event for e in p2.events[away:replayed]] == \
                (START_STOP if how == "query" else [])
            ids = [int(e.id) for e in p2.events]
            assert ids == list(range(int(seen[-1].id) + 1, int(seen[-1].id) + 1 + len(ids)))
            # then live events, none repeated
            assert d.post("/processes/w/_start").status == 200
            sse_until(s, p2, lambda p: len(p.events) >= len(ids) + N_START, 5.0,
                      "live events")
            assert [e.event for e in p2.events[-N_START:]] == START_STOP[:N_START]
            ids = [int(e.id) for e in p2.events]
            assert ids == list(range(ids[0], ids[0] + len(ids)))
        finally:
            s.close()
        assert d.post("/processes/w/_stop").status == 200
        wait_for(lambda: d.status("w")["running"] == 0, 5.0)
        # a pattern resumes with its own events only
        s = StreamReply(d.port, "/watch/proc/w/exit?feed=eventsource&heartbeat=0",
                        headers={"Last-Event-ID": seen[-1].id})
        p3 = SSEParser()
        try:
            sse_until(s, p3, lambda p: len(p.events) >= 1, 5.0, "exit events")
            assert {e.event for e in p3.events} == {"proc.w.exit"}
        finally:
            s.close()


def test_last_event_id_too_old_unknown_or_bogus(gafferd):
    d = gafferd(W)
    # an id this daemon never gave (an earlier run's): "missed" with null,
    # then every event kept, then live ones
    s = StreamReply(d.port, "/watch?feed=eventsource&heartbeat=0",
                    headers={"Last-Event-ID": "999999"})
    s.read_headers(5.0)
    parser = SSEParser()
    try:
        assert s.status == 200
        assert d.post("/processes/w/_start").status == 200
        sse_until(s, parser, lambda p: [e.event for e in p.events[-N_START:]] ==
                  START_STOP[:N_START],
                  5.0, "missed, then events")
        assert parser.events[0].event == "missed"
        assert json.loads(parser.events[0].data[0]) == {"event": "missed", "missed": None}
        assert int(parser.events[0].id) == int(parser.events[1].id) - 1 == 0
        assert "create" in [e.event for e in parser.events]   # the start-up, kept
    finally:
        s.close()
    # not an id: a 400, never a 500 (non-ASCII digits included)
    for bad in ("abc", "-1", "1.5", "\u0663", "9" * 40):
        target = "/watch?feed=eventsource&last_event_id=" + urllib.parse.quote(bad)
        r = d.get(target)
        assert r.status == 400 and r.json()["error"] == "bad_value", (bad, r)
    assert d.get("/ping").status == 200


def test_event_history_is_a_bounded_ring():
    import gafferd as g
    calls = []
    bus = g.EventBus(calls.append, history_size=5)
    got = []
    bus.subscribe(".", lambda name, payload: got.append((bus.current_id, name)))
    for i in range(8):
        bus.publish("spawn" if i % 2 else "proc.w.spawn", {"name": "w", "n": i})
    while calls:
        calls.pop(0)()
    assert got == [(i + 1, "spawn" if i % 2 else "proc.w.spawn") for i in range(8)]
    assert bus.last_id == 8 and bus.current_id is None
    assert bus.since(8) == (0, [])
    assert [e[0] for e in bus.since(5)[1]] == [6, 7, 8] and bus.since(5)[0] == 0
    assert [e[0] for e in bus.since(3)[1]] == [4, 5, 6, 7, 8]
    missed, events = bus.since(1)                 # 2 and 3 fell out of the ring
    assert missed == 2 and [e[0] for e in events] == [4, 5, 6, 7, 8]
    assert bus.since(9)[0] is None                 # never handed out
    # rendered for a feed: "missed" first (with the id before the oldest kept),
    # then the kept events of the pattern, each with its id
    text = g.watch_backlog(bus, "spawn", 1).decode()
    assert text.startswith('id: 3\r\nevent: missed\r\ndata: {"event": "missed", "missed": 2}')
    assert re.findall(r"id: (\d+)\r\nevent: spawn", text) == ["4", "6", "8"]
    assert g.watch_backlog(bus, ".", 8) == b""


def test_heartbeats_are_flushed(gafferd):
    d = gafferd(W)
    cont = watch(d, "", "feed=continuous&heartbeat=1")
    es = watch(d, "proc/w", "feed=eventsource&heartbeat=1")
    quiet = [watch(d, "", "feed=continuous&heartbeat=0"),
             watch(d, "", "feed=eventsource&heartbeat=false"),
             watch(d, "", "feed=continuous&heartbeat=true"),  # 60 s
             watch(d, "", "feed=continuous&heartbeat=")]
    try:
        t0 = time.monotonic()
        cont.read_until(lambda b: b.count(b"\n") >= 2, 5.0, "two heartbeats")
        assert json_lines(bytes(cont.body)) == []
        parser = SSEParser()
        sse_until(es, parser, lambda p: p.heartbeats >= 2, 5.0, "two SSE heartbeats")
        assert parser.events == []
        assert time.monotonic() - t0 >= 1.0
        for s in quiet:
            with pytest.raises(TimeoutError):
                s.read(0.1)
    finally:
        for s in [cont, es] + quiet:
            s.close()


def test_disconnect_releases_everything(gafferd):
    d = gafferd(W + section("s", "sleep", "600"))
    sid = wait_for(lambda: d.pids("s"))[0]
    baseline = settled_fds(d.pid)
    replies = [watch(d, ""), watch(d, "proc/w", "feed=eventsource&heartbeat=1"),
               watch(d, "spawn", "feed=continuous&heartbeat=1"),
               open_stream(d, "/stats/s?feed=continuous"),
               open_stream(d, "/stats/s/%d?feed=eventsource" % sid)]
    replies += [StreamReply(d.port, "/watch/delete?feed=longpoll") for _ in range(2)]
    try:
        wait_for(lambda: open_fds(d.pid) >= baseline + 7, 5.0,
                 message="the daemon to hold 7 feed connections")
    finally:
        for s in replies:
            s.close()
    wait_for(lambda: open_fds(d.pid) <= baseline, 5.0,
             message="the fd count back to its baseline %d" % baseline)
    # events after the disconnects reach nobody dead, and new watchers work
    all_events = watch(d, "")
    try:
        assert names(start_then_stop(d, all_events)) == START_STOP
    finally:
        all_events.close()
    assert d.get("/ping").status == 200
    wait_for(lambda: open_fds(d.pid) <= baseline, 5.0, message="the fd count back to baseline")
    assert "Traceback" not in d.log()


# -- stats feeds --------------------------------------------------------------

def check_sample(d, sample, name, ids):
    assert KEYS <= set(sample), sorted(sample)
    assert sample["name"] == name and sample["id"] in ids, sample
    assert sample["pid"] == d.os_pid(sample["id"])
    assert sample["cmdline"] == "sleep"


class Samples:
    """The stats samples of a continuous or eventsource feed, read as they come."""

    def __init__(self, d, path, feed):
        self.feed, self.parser = feed, SSEParser()
        self.reply = open_stream(d, "%s?feed=%s&heartbeat=0" % (path, feed))
        ctype = "text/event-stream" if feed == "eventsource" else "application/json"
        assert self.reply.headers["content-type"].startswith(ctype), self.reply.headers

    def all(self):
        if self.feed == "continuous":
            return json_lines(bytes(self.reply.body))
        for event in self.parser.events:
            assert event.event == "stat" and len(event.data) == 1, event
        return [json.loads(e.data[0]) for e in self.parser.events]

    def until(self, predicate, timeout, message):
        deadline = time.monotonic() + timeout
        while not predicate(self.all()):
            if self.reply.ended:
                pytest.fail("feed ended before %s" % message)
            try:
                data = self.reply.read(deadline - time.monotonic())
            except TimeoutError:
                pytest.fail("timed out after %.1fs waiting for %s" % (timeout, message))
            if self.feed == "eventsource":
                self.parser.feed(data)
        return self.all()

    def to_end(self, timeout):
        seen = len(self.reply.body)
        rest = self.reply.read_to_end(timeout)[seen:]
        if self.feed == "eventsource":
            self.parser.feed(rest)
            assert self.parser.idle
        return self.all()


@pytest.mark.parametrize("feed", ["continuous", "eventsource"])
def test_stats_feed_of_a_template_ends_when_its_processes_exit(gafferd, feed):
    d = gafferd(section("s", "sleep", "600", numprocesses="2"))
    ids = wait_for(lambda: (lambda p: len(p) == 2 and p)(d.pids("s")))
    samples = Samples(d, "/stats/s", feed)
    try:
        t0 = time.monotonic()
        got = samples.until(lambda all_: min(sum(1 for x in all_ if x.get("id") == i)
                                             for i in ids) >= 10, 5.0, "10 samples of each")
        assert time.monotonic() - t0 < 3.0, "samples come every 0.1 s"
        for sample in got[:4]:
            check_sample(d, sample, "s", ids)
        assert d.post("/processes/s/_stop").status == 200
        got = samples.to_end(5.0)  # ends once the processes have exited
        assert {x["id"] for x in got} == set(ids)
    finally:
        samples.reply.close()


@pytest.mark.parametrize("feed", ["continuous", "eventsource"])
def test_stats_feed_of_one_process_ends_when_it_exits(gafferd, feed):
    d = gafferd(section("s", "sleep", "600", numprocesses="2"))
    ids = wait_for(lambda: (lambda p: len(p) == 2 and p)(d.pids("s")))
    target = ids[1]
    # the name part is ignored for /stats/NAME/ID, as in gaffer 0.4.4
    samples = Samples(d, "/stats/whatever/%d" % target, feed)
    try:
        for sample in samples.until(lambda all_: len(all_) >= 3, 5.0, "3 samples"):
            check_sample(d, sample, "s", [target])
        os.kill(d.os_pid(target), signal.SIGKILL)
        # the feed ends, although a replacement process is spawned
        assert {x["id"] for x in samples.to_end(5.0)} == {target}
    finally:
        samples.reply.close()


def test_stats_longpoll_feeds_and_errors(gafferd):
    d = gafferd(section("s", "sleep", "600"))
    sid = wait_for(lambda: d.pids("s"))[0]
    for path in ("/stats/s?feed=longpoll", "/stats/s/%d?feed=longpoll" % sid):
        s = StreamReply(d.port, path)
        try:
            body = s.read_to_end(5.0)
            assert s.status == 200
            assert re.fullmatch(rb"\{[^\r\n]*\}\r\n", body), body
            check_sample(d, json.loads(body), "s", [sid])
        finally:
            s.close()
    r = d.get("/stats/s/999?feed=continuous")
    assert (r.status, r.json()["error"]) == (404, "not_found"), r
    r = d.get("/stats/s/abc?feed=continuous")
    # gaffer 0.4.4 said 400 bad_value; since id routes match digits only
    # the path matches no route: 404 not_found. Anything else is wrong.
    assert (r.status, r.json()["error"]) in ((400, "bad_value"), (404, "not_found")), r
