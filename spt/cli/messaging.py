"""`spt send`, `spt ring`, `spt ready`, `spt whoami`, `spt how-to`: what agents run.

Agents call these once per message, so this module imports only click, the CLI helpers and
the control-socket client; everything else waits inside the command that needs it.

Delivery is exactly once because of the order here: an envelope is written and flushed to
stdout, and only then acknowledged on the control connection (SPEC.md §4.2 step 6). SIGINT and
SIGTERM end `ready` and `ring` with exit 0, but never between that flush and its ack. A daemon
killed after the ack left but before it recorded it hands the message out again once it is back;
the listener, which outlived it, remembers what it acked and acks such a copy without printing it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from spt.cli._complete import addresses, local_ids, subnet_names
from spt.cli._output import emit, out, print_json
from spt.cli._send import identity, read_body, send_message, window
from spt.cli._state import is_interactive, state
from spt.core.errors import SptError, UsageError
from spt.core.ipc import IpcConnection

# --- identity and bodies ---------------------------------------------------------------------


def _message_options(f: Any) -> Any:
    f = click.option(
        "--json-payload", "json_payload", metavar="JSON", help="Attach compact JSON (≤ 64 KiB)."
    )(f)
    f = click.option("--idle-only", is_flag=True, help="Deliver only by a push while the endpoint is idle.")(
        f
    )
    f = click.option("--deferred", is_flag=True, hidden=True)(f)
    f = click.option("--active-only", is_flag=True, help="Deliver only when the endpoint polls (spt ready).")(
        f
    )
    f = click.option(
        "--from", "from_id", metavar="ID", help="Send as this endpoint (default: $SPT_AGENT_ID)."
    )(f)
    return f


# --- streams: signals and acks ---------------------------------------------------------------


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived outside an envelope's flush-then-ack."""


class _Stream:
    """Writes envelopes to stdout and acks them; defers signals while one is in flight."""

    ACKED_REMEMBERED = 4096  # far more than a daemon can have in flight when it dies

    def __init__(self) -> None:
        self.conn: IpcConnection | None = None
        self._critical = False
        self._pending = False
        self._acked: OrderedDict[str, None] = OrderedDict()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._critical:
            self._pending = True
            return
        raise _Interrupted

    @contextmanager
    def signals(self) -> Iterator[None]:
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def envelope(self, event: dict[str, Any]) -> None:
        """One envelope line; after the last line of a message, flush and then ack it."""
        self._critical = True
        msg = str(event["msg"])
        if msg not in self._acked:  # else a restarted daemon's copy of one already printed
            sys.stdout.write(str(event["line"]) + "\n")
        if event.get("last"):
            sys.stdout.flush()
            assert self.conn is not None
            self.conn.send({"ack": msg})
            self._acked[msg] = None
            if len(self._acked) > self.ACKED_REMEMBERED:
                self._acked.popitem(last=False)
            self._critical = False
            if self._pending:
                raise _Interrupted

    def run(self, op: str, args: dict[str, Any], on_event: Any) -> dict[str, Any] | None:
        """Call a streaming op; None when interrupted by a signal."""
        from spt.core.ipc import call, connect_or_start
        from spt.core.paths import StatePaths

        with self.signals():
            try:
                self.conn = connect_or_start(
                    StatePaths.resolve().root, autostart=os.environ.get("SPT_NO_AUTOSTART") != "1"
                )
                try:
                    result = call(
                        self.conn, op, args, on_event=on_event, timeout=None, interactive=is_interactive()
                    )
                finally:
                    self.conn.close()
            except _Interrupted:
                return None
        return result if isinstance(result, dict) else {}


# --- commands --------------------------------------------------------------------------------


@click.command()
@click.argument("address", shell_complete=addresses)
@_message_options
def send(
    address: str,
    from_id: str | None,
    active_only: bool,
    deferred: bool,
    idle_only: bool,
    json_payload: str | None,
) -> None:
    """Send stdin to ADDRESS: SENT when a listener took it, else QUEUED (do not retry)."""
    send_message(
        address, from_id=from_id, active_only=active_only, deferred=deferred, idle_only=idle_only,
        json_payload=json_payload,
    )


@click.command()
@click.argument("address", shell_complete=addresses)
@_message_options
@click.option(
    "--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for the reply."
)
def ring(
    address: str,
    from_id: str | None,
    active_only: bool,
    deferred: bool,
    idle_only: bool,
    json_payload: str | None,
    timeout: float,
) -> None:
    """Send stdin to ADDRESS and wait for the reply (printed as an envelope), else TIMEOUT."""
    chosen_window = window(active_only, deferred, idle_only)
    body = read_body()
    stream = _Stream()

    def on_event(event: dict[str, Any]) -> None:
        if "sent" in event:
            emit(str(event["sent"]), address, err=True)
        elif "line" in event:
            stream.envelope(event)

    args = {
        "address": address,
        "from": identity(from_id),
        "body": body,
        "json": json_payload,
        "window": chosen_window,
        "timeout": timeout,
    }
    result = stream.run("msg.ring", args, on_event)
    if result is not None and result.get("timeout"):
        out("TIMEOUT")
        sys.stdout.flush()


RECONNECT_SECONDS = 30.0


def _daemon_back(timeout: float) -> bool:
    """Wait (never starting a daemon: one is on its way back) until the control socket answers."""
    import time

    from spt.core.ipc import connect
    from spt.core.paths import StatePaths

    socket_path = StatePaths.resolve().socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connect(socket_path).close()
            return True
        except SptError:
            time.sleep(0.1)
    return False


@click.command()
@click.argument("endpoint_id", metavar="[ID]", required=False, shell_complete=local_ids)
@click.option("--once", is_flag=True, help="Exit after the backlog, or after one delivery.")
@click.option("--subnet", shell_complete=subnet_names, help="Home subnet for a new perch (needed when this node holds several).")
@click.option("--timeout", type=float, help="With --once: give up after this many seconds (prints TIMEOUT).")
def ready(endpoint_id: str | None, once: bool, subnet: str | None, timeout: float | None) -> None:
    """Listen as ID (default $SPT_AGENT_ID): print held messages, then new ones, one per line."""
    endpoint_id = endpoint_id or os.environ.get("SPT_AGENT_ID")
    if not endpoint_id:
        raise UsageError("NO_IDENTITY", "", "give an endpoint id or set SPT_AGENT_ID")
    from spt.core.types import check_endpoint_id

    check_endpoint_id(endpoint_id)
    if timeout is not None and not once:
        raise UsageError("BAD_USAGE", "", "--timeout applies only with --once")
    stream = _Stream()
    announced = False
    down_since: float | None = None

    def on_event(event: dict[str, Any]) -> None:
        nonlocal announced, down_since
        if "ready" in event:
            down_since = None
            if not announced:  # SPEC.md §8.8: a listener that reconnected does not say READY again
                emit("READY", str(event["ready"]), err=True)
                announced = True
        elif "line" in event:
            stream.envelope(event)

    args = {"id": endpoint_id, "once": once, "subnet": subnet, "timeout": timeout, "cwd": os.getcwd()}
    while True:
        try:
            result = stream.run("endpoint.ready", args, on_event)
            break
        except SptError as exc:
            # The daemon restarted under a listening agent (an update, a stop and start): keep
            # listening once it is back, within RECONNECT_SECONDS; anything else is the error.
            import time

            down_since = down_since or time.monotonic()
            left = down_since + RECONNECT_SECONDS - time.monotonic()
            if exc.instance_token != "DAEMON_DOWN" or not announced or left <= 0 or not _daemon_back(left):
                raise
            time.sleep(0.1)
    if result is None:
        return
    if result.get("timeout"):
        out("TIMEOUT")
        sys.stdout.flush()
    elif result.get("ended"):
        emit(str(result["ended"]), str(result.get("id", endpoint_id)), err=True)


@click.command()
@click.pass_context
def whoami(ctx: click.Context) -> None:
    """Who this caller is ($SPT_AGENT_ID), its perch state, and the subnets."""
    from spt.cli._views import show_whoami

    show_whoami(as_json=state(ctx).json)


# --- how-to ----------------------------------------------------------------------------------

TOPICS: dict[str, str] = {
    "ready": """\
Receive messages: spt ready <your-id>   (or set SPT_AGENT_ID and run spt ready)
- stderr says READY:<id> once you are listening; stdout then prints held messages, then new ones,
  one <EVENT type="msg" from="…">body</EVENT> line each (<br> is a newline; &lt; &gt; &quot; &amp;).
- spt ready --once: return after the backlog, or after one message; add --timeout <s> to get
  TIMEOUT instead of waiting for ever. A loop of `spt ready --once` is the usual agent poll.
- Each message is printed exactly once, even across crashes: do not dedupe.
- A ring="1" attribute means the sender is waiting: reply with spt send <from>.
- The first spt ready <id> creates your perch. On a node in several subnets pass --subnet <name>.
- Tell the node when you are working: spt endpoint state <id> busy|idle.""",
    "send": """\
Send a message: echo "text" | spt send <address> [--from <your-id>]
- Address: id, subnet:id, id@node, subnet:id@node. The node is a label or a key prefix.
- SENT:<address> means a listener took it; QUEUED:<address> means it is held and will be
  delivered exactly once. QUEUED is success: never retry.
- --json-payload '<json>' attaches compact JSON; --active-only waits for the receiver's own poll,
  --idle-only waits until the receiver is idle.
- NO_PERCH:<address>: nothing by that name; AMBIGUOUS: pick one of the listed forms.""",
    "ring": """\
Ask and wait: echo "question" | spt ring <address> [--timeout 120]
- stderr: SENT:/QUEUED:<address> once the request has gone.
- stdout: the reply envelope, or TIMEOUT (exit 0). The request stays delivered or queued; a late
  reply arrives at your perch like any message.
- The receiver replies with a plain spt send <your-id>: its next message to you is the reply.""",
    "subnet": """\
Subnets join machines; a human does this once, in an elevated terminal.
- spt subnet create <name> prints a six-digit code; on the other machine: spt subnet join <name>.
- spt subnet status lists subnets; spt whoami and spt endpoint list show who is reachable.
- Your endpoint is homed in the node's subnet automatically (with several: --subnet <name>).
- spt endpoint visibility show|hide <id> <subnet> controls where others can see and reach you.
- Tell the human something: spt subnet notify "<text>" [--title <t>] prints NOTIFIED:<id>; it is
  shown once, on the machine they used last. They read it with spt notif list, clear it with
  spt notif ack <id>.""",
    "file": """\
Send files: spt file send <path>… <address> [-m "note"] [--wait]
- FILE_QUEUED:<tid> means the transfer continues in the background; spt file status <tid>.
- The receiver gets a <EVENT type="file" …> envelope; the files are in its endpoint folder's
  inbox/<tid>/. Send binary or large data as files, never as message bodies.""",
    "mind": """\
Your mind: read it with spt endpoint mind; write it by dropping <id>-commune.md in your folder.
The live tier (who you are, what you are doing) follows you to every instance of your endpoint;
the project tier is shared with instances working on the same project.
- Write: put Markdown in <your endpoint folder>/<id>-commune.md ($SPT_ENDPOINT_DIR when hosted;
  else the folder spt endpoint list --detail shows). Write it elsewhere and rename it in, or just
  write it: it is taken once unchanged for 1 s. Lines "# live" and "# project" start sections;
  text before the first goes to the project tier. The file disappears once taken: that is
  success. If it turns into <id>-commune.rejected.md, the reason is in
  <id>-commune.rejected.reason.txt (and the user gets a notification).
- Each section becomes one entry (at most 64 KiB). Entries are never edited: write a new one.
- Read: spt endpoint mind [<id>] [--tier live|project] [--project <dir>] [--json] prints
  <live-context> and <project-context project="..."> blocks, oldest first; NO_CONTEXT:<id> when
  there is nothing yet.
- Your project is the id in .spt/project in your folder, else your git origin; otherwise the
  project tier stays on this node.
- spt endpoint sync-scope add|remove <id> <subnet> chooses where your mind syncs (only where
  you are visible).""",
}


@click.command("how-to")
@click.argument("topic", required=False)
@click.pass_context
def how_to(ctx: click.Context, topic: str | None) -> None:
    """Task-oriented guidance for agents: ready, send, ring, subnet, file, mind."""
    as_json = state(ctx).json
    if topic is None:
        if as_json:
            print_json({"topics": list(TOPICS)})
            return
        out("Topics (spt how-to <topic>):")
        for name, guide in TOPICS.items():
            out(f"  {name:7} {guide.splitlines()[0]}")
        return
    text = TOPICS.get(topic.lower())
    if text is None:
        raise UsageError("NO_SUCH_TOPIC", topic, f"topics: {', '.join(TOPICS)}")
    if as_json:
        print_json({"topic": topic.lower(), "text": text})
    else:
        out(text)
