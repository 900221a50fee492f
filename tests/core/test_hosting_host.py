"""The host process of a hosted endpoint, spoken to over its socket as the daemon and viewers do."""

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spt.core.hosting.wire import encode, read_frame

RAW_LOGGER = r"""
import os, sys, tty
tty.setraw(0)  # flushes pending input: viewers type once "ready" shows
log = open(sys.argv[1], "wb")
os.write(1, b"ready")
while True:
    data = os.read(0, 1024)
    if not data:
        break
    log.write(data); log.flush()
"""

SIZE_PRINTER = r"""
import os, time
last = None
for _ in range(400):
    size = os.get_terminal_size(0)
    if size != last:
        print(f"size {size.lines} {size.columns}", flush=True)
        last = size
    time.sleep(0.02)
"""


class Host:
    def __init__(self, tmp_path, argv, *, buffer_bytes=4 * 1024 * 1024, linger=1.0):
        self.socket = tmp_path / "h.sock"
        spec = {"argv": argv, "env": dict(os.environ), "cwd": str(tmp_path), "socket": str(self.socket),
                "exit_file": str(tmp_path / "h.exit"), "buffer_bytes": buffer_bytes, "linger": linger}
        (tmp_path / "h.json").write_text(json.dumps(spec))
        self.proc = subprocess.Popen([sys.executable, "-m", "spt.core.hosting.host", str(tmp_path / "h.json")],
                                     stdout=subprocess.PIPE, start_new_session=True)
        pids = json.loads(self.proc.stdout.readline())
        self.pid = pids["pid"]

    async def ask(self, msg):
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        writer.write(encode(msg))
        await writer.drain()
        answer = await read_frame(reader)
        writer.close()
        return answer

    async def attach(self, **hello):
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        writer.write(encode({"t": "attach", "offset": None, "replay": True, **hello}))
        await writer.drain()
        return reader, writer

    def close(self):
        if self.proc.poll() is None:
            self.socket.unlink(missing_ok=True)  # the host ends its command and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def hosts():
    made = []
    yield lambda *a, **k: made.append(Host(*a, **k)) or made[-1]
    for host in made:
        host.close()


async def frames_until(reader, predicate, timeout=10.0):
    got = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await read_frame(reader)
            assert msg is not None, got
            got.append(msg)
            if predicate(msg, got):
                return got


async def test_a_gap_beyond_the_buffer_is_reported_with_its_size(hosts, tmp_path):
    host = hosts(tmp_path, [sys.executable, "-c", "import sys, time; sys.stdout.write('x' * 300000); "
                            "sys.stdout.flush(); time.sleep(30)"], buffer_bytes=4096)
    for _ in range(100):
        if (await host.ask({"t": "status"}))["end"] >= 300000:
            break
        await asyncio.sleep(0.05)
    reader, writer = await host.attach(offset=0, viewer="v")
    got = await frames_until(reader, lambda m, g: sum(len(x.get("data", b"")) for x in g) >= 4096)
    hello, lost = got[0], got[1]
    assert hello["t"] == "hello" and lost == {"t": "lost", "from": 0, "to": 300000 - 4096}
    outs = [m for m in got if m["t"] == "out"]
    assert outs[0]["off"] == 300000 - 4096 and b"".join(m["data"] for m in outs) == b"x" * 4096
    writer.close()


async def test_input_is_applied_once_per_viewer_across_reconnects_and_never_from_read_only(hosts, tmp_path):
    log = tmp_path / "in.log"
    host = hosts(tmp_path, [sys.executable, "-c", RAW_LOGGER, str(log)])
    reader, writer = await host.attach(viewer="v1")
    await frames_until(reader, lambda m, g: b"ready" in b"".join(x.get("data", b"") for x in g))
    for seq, data in ((1, b"a"), (2, b"b")):
        writer.write(encode({"t": "input", "seq": seq, "data": data}))
    await frames_until(reader, lambda m, g: (m.get("t") == "ack" and m["seq"] == 2) or m.get("ack") == 2)
    writer.close()
    reader, writer = await host.attach(viewer="v1")
    hello = (await frames_until(reader, lambda m, g: m["t"] == "hello"))[-1]
    assert hello["applied"] == 2 and hello["pid"] == host.pid
    for seq, data in ((2, b"b"), (3, b"c")):  # 2 is a resend after the cut
        writer.write(encode({"t": "input", "seq": seq, "data": data}))
    await frames_until(reader, lambda m, g: (m.get("t") == "ack" and m["seq"] == 3) or m.get("ack") == 3)
    _ro_reader, ro_writer = await host.attach(viewer="v2", read_only=True)
    ro_writer.write(encode({"t": "input", "seq": 1, "data": b"z"}))
    await ro_writer.drain()
    await asyncio.sleep(0.3)
    deadline = time.monotonic() + 5
    while log.read_bytes() != b"abc" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert log.read_bytes() == b"abc"
    writer.close()
    ro_writer.close()


async def test_the_terminal_size_follows_the_latest_client(hosts, tmp_path):
    host = hosts(tmp_path, [sys.executable, "-c", SIZE_PRINTER])
    r1, w1 = await host.attach(viewer="a", rows=30, cols=100)
    await frames_until(r1, lambda m, g: b"size 30 100" in b"".join(x.get("data", b"") for x in g))
    r2, w2 = await host.attach(viewer="b", rows=40, cols=120)
    await frames_until(r2, lambda m, g: b"size 40 120" in b"".join(x.get("data", b"") for x in g))
    w1.write(encode({"t": "resize", "rows": 50, "cols": 132}))
    await frames_until(r2, lambda m, g: b"size 50 132" in b"".join(x.get("data", b"") for x in g))
    w1.close()
    w2.close()


@pytest.mark.parametrize(("script", "code"), [("exit 3", 3), ("kill -TERM $$", 143)])
async def test_the_exit_is_reported_to_watchers_and_viewers(hosts, tmp_path, script, code):
    host = hosts(tmp_path, ["sh", "-c", f"echo bye; sleep 0.3; {script}"])
    reader, writer = await asyncio.open_unix_connection(str(host.socket))
    writer.write(encode({"t": "watch"}))
    await writer.drain()
    got = await frames_until(reader, lambda m, g: m["t"] == "ended")
    assert got[-1]["exit"] == code
    writer.close()
    viewer, vw = await host.attach(viewer="late", offset=0)  # during the linger: tail and exit
    got = await frames_until(viewer, lambda m, g: m["t"] == "ended")
    assert b"bye" in b"".join(m.get("data", b"") for m in got) and got[-1]["exit"] == code
    vw.close()
    assert json.loads((tmp_path / "h.exit").read_text())["exit"] == code


def test_removing_the_socket_ends_the_command_and_the_host(hosts, tmp_path):
    host = hosts(tmp_path, ["sleep", "60"])
    host.socket.unlink()
    host.proc.wait(10)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{host.pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{host.pid}")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["offset", "replay", "read_only", "rows", "cols", "viewer", "seq", "data", "run"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=80), st.binary(max_size=80))))
def test_rc_stream_fields_from_the_network_are_checked(fields):
    # the rc stream handler's decoders: garbage is refused as a usage error or ignored, never a crash
    from spt.core.errors import UsageError
    from spt.plugins.rc.service import _hello, _input

    try:
        hello = _hello(fields)
    except UsageError:
        pass
    else:
        assert hello["offset"] is None or hello["offset"] >= 0
        assert set(hello) <= {"offset", "replay", "read_only", "viewer", "rows", "cols", "run"}
    item = _input(fields)
    assert item is None or (item[0] > 0 and isinstance(item[1], bytes))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_the_host_socket_decoder_refuses_garbage_with_a_wire_error(data):
    from spt.core.hosting.wire import WireError

    async def decode_all():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        while (msg := await read_frame(reader)) is not None:
            assert isinstance(msg["t"], str)

    with contextlib.suppress(WireError):
        asyncio.run(decode_all())


async def test_offsets_of_another_run_are_not_resumed(hosts, tmp_path):
    host = hosts(tmp_path, [sys.executable, "-c", "import time; print('fresh run'); time.sleep(30)"])
    for _ in range(100):
        if (await host.ask({"t": "status"}))["end"] > 0:
            break
        await asyncio.sleep(0.05)
    reader, writer = await host.attach(viewer="v", offset=5000, run=host.pid + 1)  # an old run's offset
    got = await frames_until(reader, lambda m, g: b"fresh run" in b"".join(x.get("data", b"") for x in g))
    assert got[0]["start"] == 0 and got[1]["off"] == 0
    writer.close()


HELD_READER = r"""
import os, select, sys, time, tty
tty.setraw(0)
go, log = sys.argv[1], open(sys.argv[2], "wb")
os.write(1, b"ready")
while not os.path.exists(go):  # not reading yet: the PTY, then the host's input queue, fill up
    time.sleep(0.05)
while select.select([0], [], [], 5)[0]:
    data = os.read(0, 65536)
    if not data:
        break
    log.write(data); log.flush()
"""


async def test_input_beyond_the_hosts_queue_waits_and_is_never_dropped_after_its_ack(hosts, tmp_path):
    # A viewer types faster than the program reads (1.5 MiB against a 1 MiB queue). Input the host
    # acknowledges is never resent, so it must reach the program: none dropped, each once, in order.
    go, log = tmp_path / "go", tmp_path / "in.log"
    frames = [bytes([97 + i % 26]) * 65536 for i in range(24)]
    host = hosts(tmp_path, [sys.executable, "-c", HELD_READER, str(go), str(log)])
    reader, writer = await host.attach(viewer="v")
    await frames_until(reader, lambda m, g: b"ready" in b"".join(x.get("data", b"") for x in g))
    acked = [0]

    async def collect():
        while (msg := await read_frame(reader)) is not None:
            seq = msg.get("seq") if msg["t"] == "ack" else msg.get("ack")
            if isinstance(seq, int):
                acked[0] = max(acked[0], seq)

    async def type_all():
        for seq, data in enumerate(frames, 1):
            writer.write(encode({"t": "input", "seq": seq, "data": data}))
            await writer.drain()

    collector, typing = asyncio.ensure_future(collect()), asyncio.ensure_future(type_all())
    await asyncio.sleep(1.0)  # the program reads nothing meanwhile
    assert acked[0] < len(frames)  # what the program cannot take yet is not acknowledged
    go.touch()
    async with asyncio.timeout(20):
        await typing
        while acked[0] < len(frames):
            await asyncio.sleep(0.05)
        want = b"".join(frames)
        while log.stat().st_size < len(want) if log.exists() else True:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert log.read_bytes() == want
    collector.cancel()
    writer.close()


async def test_a_read_only_viewer_cannot_change_the_terminal_size(hosts, tmp_path):
    host = hosts(tmp_path, [sys.executable, "-c", SIZE_PRINTER])
    r1, w1 = await host.attach(viewer="a", rows=30, cols=100)
    await frames_until(r1, lambda m, g: b"size 30 100" in b"".join(x.get("data", b"") for x in g))
    _r2, w2 = await host.attach(viewer="b", rows=40, cols=120, read_only=True)
    w2.write(encode({"t": "resize", "rows": 50, "cols": 132}))
    await w2.drain()
    await asyncio.sleep(0.3)
    w1.write(encode({"t": "resize", "rows": 20, "cols": 90}))
    got = b"".join(m.get("data", b"") for m in
                   await frames_until(r1, lambda m, g: b"size 20 90" in b"".join(x.get("data", b"") for x in g)))
    assert b"size 40 120" not in got and b"size 50 132" not in got
    w1.close()
    w2.close()


async def test_a_read_only_viewer_that_stops_reading_does_not_hold_the_program_back(hosts, tmp_path):
    total = 4 * 1024 * 1024
    go = tmp_path / "go"
    program = (f"import os, sys, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)\n"
               f"sys.stdout.write('y' * {total}); sys.stdout.flush(); time.sleep(30)")
    host = hosts(tmp_path, [sys.executable, "-c", program], buffer_bytes=65536)
    reader, writer = await host.attach(viewer="watcher", read_only=True)  # and never reads
    go.touch()
    deadline = time.monotonic() + 15
    while (await host.ask({"t": "status"}))["end"] < total:
        assert time.monotonic() < deadline, "the program was held back by a read-only viewer"
        await asyncio.sleep(0.1)
    # when it reads again it is told, explicitly, what it missed: every byte up to the end is
    # either sent or inside a `lost` range, in order (the sender may have woken mid-write, when
    # the socket buffers drained, so there can be several ranges)
    got = await frames_until(reader, lambda m, g: m["t"] == "out" and m["off"] + len(m["data"]) >= total, timeout=15)
    at, lost_bytes = 0, 0  # attached before the program wrote anything
    for msg in got:
        if msg["t"] == "lost":
            assert msg["from"] == at and msg["to"] > at, (msg, at)
            lost_bytes += msg["to"] - at
            at = msg["to"]
        elif msg["t"] == "out":
            assert msg["off"] == at, (msg["off"], at)
            at += len(msg["data"])
    assert at == total and lost_bytes >= total - 1024 * 1024, lost_bytes  # the rest sat in socket buffers
    writer.close()
