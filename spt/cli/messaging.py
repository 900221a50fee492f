"""`spt send`, `spt ring`, `spt ready`, `spt whoami`, `spt how-to`: what agents run.

These click commands parse and explain; their bodies are click-free (`_send.py`, `_stream.py`,
`_views.py`), so that the plain path of `_fast.py` runs the same code without loading click.
"""

from __future__ import annotations

from typing import Any

import click

from spt.cli._complete import addresses, local_ids, subnet_names
from spt.cli._output import out, print_json
from spt.cli._send import send_message
from spt.cli._state import state
from spt.core.errors import UsageError

# --- options -------------------------------------------------------------------------------


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
    from spt.cli._stream import ring_message

    ring_message(
        address, from_id=from_id, active_only=active_only, deferred=deferred, idle_only=idle_only,
        json_payload=json_payload, timeout=timeout,
    )


@click.command()
@click.argument("endpoint_id", metavar="[ID]", required=False, shell_complete=local_ids)
@click.option("--once", is_flag=True, help="Exit after the backlog, or after one delivery.")
@click.option("--subnet", shell_complete=subnet_names, help="Home subnet for a new perch (needed when this node holds several).")
@click.option("--timeout", type=float, help="With --once: give up after this many seconds (prints TIMEOUT).")
def ready(endpoint_id: str | None, once: bool, subnet: str | None, timeout: float | None) -> None:
    """Listen as ID (default $SPT_AGENT_ID): print held messages, then new ones, one per line."""
    from spt.cli._stream import listen

    listen(endpoint_id, once=once, subnet=subnet, timeout=timeout)


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
- A ring="1" attribute means the sender is waiting: reply with spt send <from>. Other attributes:
  json="…" (the sender's --json-payload), reply_to="<id>" (an answer to your ring).
- A body over 64 KiB comes as <EVENT-PART seq="1/n" id="…" …>chunk</EVENT-PART> lines, back to
  back: decode each chunk, join them in seq order; json="…" is on part 1 only.
- type="file" is a received file: path="inbox/<tid>/<name>" is relative to your endpoint folder.
- spt ready ends with exit 0 on Ctrl-C, on spt endpoint stop (stderr STOPPED:<id>) and on suspend
  (stderr SUSPENDED:<id>). Exit 2 is a bad id or option, 3 no daemon (DAEMON_DOWN).
- The first spt ready <id> creates your perch. On a node in several subnets pass --subnet <name>.
- Tell the node when you are working: spt endpoint state <id> busy|idle.""",
    "send": """\
Send a message: echo "text" | spt send <address> [--from <your-id>]
- Address: id, subnet:id, id@node, subnet:id@node. The node is a label or a key prefix.
- SENT:<address> means a listener took it; QUEUED:<address> means it is held and will be
  delivered exactly once. QUEUED is success: never retry.
- --json-payload '<json>' attaches compact JSON; --active-only waits for the receiver's own poll,
  --idle-only waits until the receiver is idle.
- Who you are: --from <your-id>, else $SPT_AGENT_ID; with neither you send as a temporary
  tmp.<8hex> identity, and replies to it are kept for one hour only.
- The body is UTF-8 text up to 1 MiB (BAD_BODY otherwise): send binary or big data as a file.
- Exit 0: SENT or QUEUED. Exit 1: a refusal, its token on stderr: NO_PERCH:<address> (nothing by
  that name), AMBIGUOUS (pick one of the listed forms), NO_SUCH_NODE, NO_SUCH_SUBNET, SPOOL_FULL.
  Exit 2: BAD_ADDRESS, BAD_JSON, BAD_BODY (fix the call). Exit 3: DAEMON_DOWN.""",
    "ring": """\
Ask and wait: echo "question" | spt ring <address> [--timeout 120]
- stderr: SENT:/QUEUED:<address> once the request has gone.
- stdout: the reply envelope, or TIMEOUT (exit 0). The request stays delivered or queued; a late
  reply arrives at your perch like any message.
- The receiver replies with a plain spt send <your-id>: its next message to you is the reply.
- Ring as yourself (--from <your-id> or $SPT_AGENT_ID) so that a late reply reaches your perch;
  refusals and exit codes are send's (spt how-to send).""",
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
- --wait blocks until the receiver verified it: FILE_SENT:<tid>. Refusals: FILE_UNREADABLE:<path>
  (missing, a symlink or a device), FILE_REFUSED:<tid> <reason> (the receiver's limits), NO_PERCH.
- The receiver gets a <EVENT type="file" …> envelope; the files are in its endpoint folder's
  inbox/<tid>/ (the path="…" attribute). Send binary or large data as files, not as messages.
- spt file list --all shows finished transfers too; spt file cancel <tid> stops one.""",
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
