"""`spt endpoint …`: list, description, state, suspend/wake, stop, fork, visibility, sync-scope, purge.

Thin: parse, ask the daemon, print the token or the document. Hosted endpoints (`endpoint run`)
live elsewhere.
"""

from __future__ import annotations

import os
from typing import Any

import click

from spt.cli._complete import addresses, local_ids, subnet_names
from spt.cli._output import emit, hint, out, print_json
from spt.cli._state import daemon_call, is_interactive, state
from spt.core.errors import UsageError


class _EndpointGroup(click.Group):
    """`spt endpoint` alone (or with list's options) is `spt endpoint list`; an unknown verb is
    an error that names it, never a list."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # (not while completing: the verbs themselves are what the shell asks for)
        if not ctx.resilient_parsing and (
            not args or (args[0].startswith("-") and args[0] not in ("-h", "--help"))
        ):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_EndpointGroup, epilog="\b\nExamples:\n  spt endpoint list --detail\n  spt endpoint stop bob\n  spt endpoint visibility hide bob work\n")
def endpoint() -> None:
    """Endpoints: the perches on this node and the rows of your subnets."""


@endpoint.command("list")
@click.option("--detail", is_flag=True, help="Add description, home, visibility, scope and folders.")
@click.option("--subnet", shell_complete=subnet_names, help="Only this subnet.")
@click.pass_context
def list_(ctx: click.Context, detail: bool, subnet: str | None) -> None:
    """Endpoints visible in each subnet, then this node's perches."""
    from spt.cli._views import list_endpoints

    list_endpoints(detail=detail, subnet=subnet, as_json=state(ctx).json)


# --- hosted endpoints ------------------------------------------------------------------------


@endpoint.command(context_settings={"ignore_unknown_options": True})
@click.option("--id", "endpoint_id", help="The endpoint id (default: the command's base name).")
@click.option("--subnet", help="Home subnet (needed when this node holds several).")
@click.option("--project", type=click.Path(file_okay=False, exists=True), help="Working folder (default: here).")
@click.option("--no-remote-attach", is_flag=True, help="Refuse remote viewers (spt rc from other nodes).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def run(endpoint_id: str | None, subnet: str | None, project: str | None, no_remote_attach: bool,
        command: tuple[str, ...]) -> None:
    """Run COMMAND as a hosted endpoint, in a PTY that outlives the daemon.

    \b
    Example:
      spt endpoint run --id coder -- claude
      spt rc coder            # watch and type, from this or any member node
    """
    from spt.core.errors import TokenError

    args = {
        "argv": list(command), "id": endpoint_id, "subnet": subnet, "no_remote_attach": no_remote_attach,
        "env": dict(os.environ), "cwd": os.path.abspath(project or os.getcwd()),
    }
    try:
        doc = daemon_call("endpoint.run", args)
    except TokenError as exc:  # a refusal from the daemon arrives as a TokenError, not a Refusal
        if exc.instance_token != "MULTI_SUBNET_HOME" or subnet or not is_interactive() or not exc.lines:
            raise
        names = [line.strip() for line in exc.lines]
        choice = click.prompt("Home subnet for this endpoint", default=names[0], type=click.Choice(names))
        doc = daemon_call("endpoint.run", {**args, "subnet": choice})
    emit("ENDPOINT_RUN", doc["id"], f"pid={doc['pid']}")
    emit("ENDPOINT_RUN_STARTED", doc["id"], f"(attach with spt rc {doc['id']})")


# --- description -----------------------------------------------------------------------------


@endpoint.group(epilog="\b\nExamples:\n  spt endpoint description set bob 'reviews Python pull requests'\n  spt endpoint description show bob@desk\n")
def description() -> None:
    """The yellow-pages text of a local perch (≤ 1024 bytes)."""


@description.command("set")
@click.argument("endpoint_id", metavar="ID", shell_complete=local_ids)
@click.argument("text", required=False)
@click.option("--clear", is_flag=True, help="Remove the description.")
def description_set(endpoint_id: str, text: str | None, clear: bool) -> None:
    """Set (or --clear) the description of perch ID."""
    if text is None and not clear:
        raise UsageError("BAD_USAGE", "", "give the text, or --clear")
    if text is not None and clear:
        raise UsageError("BAD_USAGE", "", "give the text or --clear, not both")
    doc = daemon_call("endpoint.description.set", {"id": endpoint_id, "text": text, "clear": clear})
    emit("DESCRIPTION_SET", doc["id"])


@description.command("show")
@click.argument("address", shell_complete=addresses)
@click.pass_context
def description_show(ctx: click.Context, address: str) -> None:
    """Print the description of the endpoint ADDRESS resolves to."""
    doc = daemon_call("endpoint.description.show", {"address": address})
    if state(ctx).json:
        print_json(doc)
    else:
        out(doc["description"])


# --- activity and states ---------------------------------------------------------------------


@endpoint.command("state")
@click.argument("endpoint_id", metavar="ID", shell_complete=local_ids)
@click.argument("activity", type=click.Choice(["busy", "idle"]))
def state_(endpoint_id: str, activity: str) -> None:
    """Report that perch ID is busy or idle (idle-only messages wait for idle)."""
    from spt.cli._views import set_activity

    set_activity(endpoint_id, activity)


@endpoint.command()
@click.argument("address", shell_complete=addresses)
@click.option("--warm", is_flag=True, help="Dormant rather than suspended.")
@click.option(
    "--grace", type=float, default=10.0, show_default=True, help="Seconds a hosted process gets to exit."
)
def suspend(address: str, warm: bool, grace: float) -> None:
    """Rest the endpoint at ADDRESS; messages to it are held until wake."""
    doc = daemon_call(
        "endpoint.suspend", {"address": address, "warm": warm, "grace": grace}, timeout=grace + 60
    )
    emit(doc["token"], address)


@endpoint.command()
@click.argument("address", shell_complete=addresses)
def wake(address: str) -> None:
    """Wake the endpoint at ADDRESS; its next spt ready drains what was held."""
    doc = daemon_call("endpoint.wake", {"address": address})
    emit(doc["token"], address)


@endpoint.command()
@click.argument("endpoint_id", metavar="ID", shell_complete=local_ids)
def stop(endpoint_id: str) -> None:
    """End the listener of local perch ID (the spool and state are kept)."""
    emit("STOPPED", daemon_call("endpoint.stop", {"id": endpoint_id})["id"])


@endpoint.command()
@click.argument("endpoint_id", metavar="ID", shell_complete=local_ids)
@click.argument("new_id", metavar="NEW-ID")
@click.option("--subnet", shell_complete=subnet_names, help="Home of the fork (needed when this node holds several subnets).")
def fork(endpoint_id: str, new_id: str, subnet: str | None) -> None:
    """Make NEW-ID, a new identity seeded from ID, as an unbound perch."""
    doc = daemon_call("endpoint.fork", {"id": endpoint_id, "new_id": new_id, "subnet": subnet})
    emit("FORKED", doc["id"], f"from={doc['from']}")


@endpoint.command()
@click.argument("endpoint_id", metavar="ID", shell_complete=local_ids)
@click.option("--yes", is_flag=True, help="Do not ask (required when not interactive).")
def purge(endpoint_id: str, yes: bool) -> None:
    """Delete perch ID with its spool, settings and folder."""
    if not yes:
        if not is_interactive():
            raise UsageError("BAD_USAGE", "", "pass --yes to purge without a terminal to confirm")
        click.confirm(f"Purge {endpoint_id} and drop what it holds?", abort=True)
    doc = daemon_call("endpoint.purge", {"id": endpoint_id})
    emit("PURGED", doc["id"])
    if doc["dropped"]:
        hint(f"dropped {doc['dropped']} queued message(s)")


# --- visibility and sync scope ---------------------------------------------------------------


def _settings_lines(doc: dict[str, Any]) -> None:
    for sub in doc["subnets"]:
        flags = [f for f, on in (("home", sub["home"]), ("in-scope", sub["in_scope"])) if on]
        out("  ".join([sub["subnet"], "visible" if sub["visible"] else "hidden", *flags]))


@endpoint.group(epilog="\b\nExamples:\n  spt endpoint visibility list bob\n  spt endpoint visibility show bob work\n")
def visibility() -> None:
    """Where a local instance is advertised and reachable, per subnet."""


@visibility.command("list")
@click.argument("endpoint_id", metavar="ID", shell_complete=local_ids)
@click.pass_context
def visibility_list(ctx: click.Context, endpoint_id: str) -> None:
    """One line per held subnet: visible or hidden, home, in scope."""
    doc = daemon_call("endpoint.visibility.list", {"id": endpoint_id})
    if state(ctx).json:
        print_json(doc)
    else:
        _settings_lines(doc)


@visibility.command("show")
@click.argument("endpoint_id", metavar="ID", shell_complete=local_ids)
@click.argument("subnet", shell_complete=subnet_names)
def visibility_show(endpoint_id: str, subnet: str) -> None:
    """Make ID visible (advertised and routable) in SUBNET."""
    doc = daemon_call("endpoint.visibility.set", {"id": endpoint_id, "subnet": subnet, "visible": True})
    emit("VISIBLE", doc["id"], doc["subnet"])


@visibility.command("hide")
@click.argument("endpoint_id", metavar="ID", shell_complete=local_ids)
@click.argument("subnet", shell_complete=subnet_names)
def visibility_hide(endpoint_id: str, subnet: str) -> None:
    """Hide ID in SUBNET: from there it looks exactly like a missing endpoint."""
    doc = daemon_call("endpoint.visibility.set", {"id": endpoint_id, "subnet": subnet, "visible": False})
    emit("HIDDEN", doc["id"], doc["subnet"])


@endpoint.group("sync-scope", epilog="\b\nExamples:\n  spt endpoint sync-scope list bob\n  spt endpoint sync-scope add bob work\n")
def sync_scope() -> None:
    """The subnets an endpoint's mind syncs to (only where it is also visible)."""


@sync_scope.command("list")
@click.argument("endpoint_id", metavar="ID", shell_complete=local_ids)
@click.pass_context
def sync_scope_list(ctx: click.Context, endpoint_id: str) -> None:
    """The subnets in ID's sync scope, one per line."""
    doc = daemon_call("endpoint.scope.list", {"id": endpoint_id})
    if state(ctx).json:
        print_json(doc)
        return
    for sub in doc["subnets"]:
        if sub["in_scope"]:
            out(sub["subnet"] if sub["visible"] else f"{sub['subnet']}  (hidden: nothing syncs)")


@sync_scope.command("add")
@click.argument("endpoint_id", metavar="ID", shell_complete=local_ids)
@click.argument("subnet", shell_complete=subnet_names)
def sync_scope_add(endpoint_id: str, subnet: str) -> None:
    """Let ID's mind sync to SUBNET."""
    doc = daemon_call("endpoint.scope.set", {"id": endpoint_id, "subnet": subnet, "in_scope": True})
    emit("SCOPE_ADDED", doc["id"], doc["subnet"])
    if doc["hidden"]:
        hint(
            f"note: {doc['id']} is hidden in {doc['subnet']}; nothing syncs there until you run: "
            f"spt endpoint visibility show {doc['id']} {doc['subnet']}"
        )


@sync_scope.command("remove")
@click.argument("endpoint_id", metavar="ID", shell_complete=local_ids)
@click.argument("subnet", shell_complete=subnet_names)
def sync_scope_remove(endpoint_id: str, subnet: str) -> None:
    """Stop ID's mind syncing to SUBNET."""
    doc = daemon_call("endpoint.scope.set", {"id": endpoint_id, "subnet": subnet, "in_scope": False})
    emit("SCOPE_REMOVED", doc["id"], doc["subnet"])


@endpoint.command("mind")
@click.argument("endpoint_id", metavar="[ID]", required=False, shell_complete=local_ids)
@click.option("--tier", type=click.Choice(["live", "project"]), help="Only this tier.")
@click.option("--project", "project_dir", type=click.Path(file_okay=False, exists=True),
              help="The project folder (default: where ID last ran spt ready).")
@click.pass_context
def mind(ctx: click.Context, endpoint_id: str | None, tier: str | None, project_dir: str | None) -> None:
    """ID's mind (default $SPT_AGENT_ID): the live tier, then the current project's, in HLC order."""
    endpoint_id = endpoint_id or os.environ.get("SPT_AGENT_ID")
    if not endpoint_id:
        raise UsageError("NO_IDENTITY", "", "give an endpoint id or set SPT_AGENT_ID")
    args = {"id": endpoint_id, "tier": tier, "project": os.path.abspath(project_dir) if project_dir else None}
    doc = daemon_call("mind.read", args)
    if state(ctx).json:  # `--json` before or after the verb (spt.cli._lazy.accept_json_anywhere)
        print_json(doc)
        return
    project = doc["project"]
    if not doc["live"] and not (project and project["entries"]):
        from spt.core.errors import Refusal

        raise Refusal("NO_CONTEXT", doc["id"], "no mind entries yet; drop a commune file to write one")
    if doc["live"]:
        out("<live-context>")
        out("\n\n".join(e["body"] for e in doc["live"]))
        out("</live-context>")
    if project and project["entries"]:
        out(f'<project-context project="{project["id"]}">')
        out("\n\n".join(e["body"] for e in project["entries"]))
        out("</project-context>")
