"""`spt subnet …`: status, create, join, show-code, detach/attach, leave, prune, unlock."""

from __future__ import annotations

import click

from spt.cli._complete import subnet_names
from spt.cli._output import emit
from spt.cli._state import daemon_call, is_interactive, require_elevation, state
from spt.cli._subnet import create_subnet, join_subnet, print_code, show_subnet_code, subnet_status
from spt.core.errors import UsageError


class _SubnetGroup(click.Group):
    """`spt subnet` alone (or with status's options) is `spt subnet status`; an unknown verb is
    an error that names it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # (not while completing: the verbs themselves are what the shell asks for)
        if not ctx.resilient_parsing and (
            not args or (args[0].startswith("-") and args[0] not in ("-h", "--help"))
        ):
            args = ["status", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_SubnetGroup, epilog="\b\nExamples:\n  sudo spt subnet create home\n  sudo spt subnet join home --peer 192.168.1.20:47470\n  spt subnet status --nodes --json\n")
def subnet() -> None:
    """Subnets: named groups of your machines, joined once with a six-digit code."""


@subnet.command()
@click.argument("name", required=False, shell_complete=subnet_names)
@click.option("--nodes", is_flag=True, help="One line per member node.")
@click.option("--all", "show_all", is_flag=True, help="Include nodes that left or were pruned.")
@click.pass_context
def status(ctx: click.Context, name: str | None, nodes: bool, show_all: bool) -> None:
    """Show held subnets (never prints a secret)."""
    subnet_status(name, nodes=nodes, show_all=show_all, as_json=state(ctx).json)


@subnet.command()
@click.argument("name")
@click.option("--allow-duplicate-name", is_flag=True, help="Create even if a subnet of that name answers nearby.")
def create(name: str, allow_duplicate_name: bool) -> None:
    """Mint a subnet and print its joining code [elevated]."""
    create_subnet(name, allow_duplicate_name=allow_duplicate_name)


@subnet.command("show-code")
@click.argument("name", required=False, shell_complete=subnet_names)
@click.option("--no-qr", is_flag=True, help="Do not print the QR code.")
def show_code(name: str | None, no_qr: bool) -> None:
    """Print the current six digits, the otpauth:// URI and a QR code [elevated]."""
    show_subnet_code(name, no_qr=no_qr)


@subnet.command()
@click.argument("name")
@click.option("--code", help="The six digits shown on a member (otherwise prompted).")
@click.option("--id", "subnet_id", help="Choose among subnets that share the name (hex prefix).")
@click.option("--peer", "peers", multiple=True, help="Also try this host:port (repeatable).")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Discovery budget in seconds.")
def join(name: str, code: str | None, subnet_id: str | None, peers: tuple[str, ...], timeout: float) -> None:
    """Join a subnet with the code shown on a member [elevated]."""
    join_subnet(name, code=code, subnet_id=subnet_id, peers=peers, timeout=timeout)


@subnet.command()
@click.argument("name", shell_complete=subnet_names)
def detach(name: str) -> None:
    """Stop serving a subnet without leaving it."""
    emit("DETACHED", daemon_call("subnet.detach", {"name": name})["name"])


@subnet.command()
@click.argument("name", shell_complete=subnet_names)
def attach(name: str) -> None:
    """Resume serving a detached subnet."""
    emit("ATTACHED", daemon_call("subnet.attach", {"name": name})["name"])


@subnet.command()
@click.argument("name", shell_complete=subnet_names)
@click.option("--yes", is_flag=True, help="Do not ask (required when not interactive).")
def leave(name: str, yes: bool) -> None:
    """Leave a subnet; endpoints homed there become local-only [elevated]."""
    require_elevation()
    if not yes:
        if not is_interactive():
            raise UsageError("BAD_USAGE", "", "pass --yes to leave without a terminal to confirm")
        click.confirm(f"Leave subnet {name}?", abort=True)
    doc = daemon_call("subnet.leave", {"name": name})
    emit("LEFT", doc["name"])
    for endpoint_id in doc.get("orphaned", []):
        emit("ORPHANED", endpoint_id)


@subnet.command()
@click.argument("node")
@click.option("--subnet", "subnet_name", shell_complete=subnet_names, help="The subnet (needed when this node holds several).")
@click.option("--yes", is_flag=True, help="Do not ask (required when not interactive).")
def prune(node: str, subnet_name: str | None, yes: bool) -> None:
    """Remove a node subnet-wide and rotate the joining secret [elevated]."""
    require_elevation()
    if not yes:
        if not is_interactive():
            raise UsageError("BAD_USAGE", "", "pass --yes to prune without a terminal to confirm")
        click.confirm(f"Prune {node}?", abort=True)
    doc = daemon_call("subnet.prune", {"node": node, "subnet": subnet_name})
    emit("PRUNED", doc["pruned"], doc["name"])
    print_code(doc)


@subnet.command()
@click.argument("name", shell_complete=subnet_names)
def unlock(name: str) -> None:
    """End a join lockout early, subnet-wide [elevated]."""
    require_elevation()
    emit("UNLOCKED", daemon_call("subnet.unlock", {"name": name})["name"])


@subnet.command()
@click.argument("body", required=False)
@click.option("--subnet", "subnet_name", help="The subnet to notify (needed when this node holds several).")
@click.option("--title", help="A short title (default: the body's first line).")
def notify(body: str | None, subnet_name: str | None, title: str | None) -> None:
    """Raise a notification for the user, shown once on the machine they last used."""
    import sys

    if body is None and not sys.stdin.isatty():
        body = sys.stdin.read()
    body = (body or "").rstrip("\n")
    if not body.strip() and not title:
        raise UsageError("BAD_USAGE", "", "give a body (argument or stdin) or --title")
    doc = daemon_call("notif.raise", {"body": body, "subnet": subnet_name, "title": title or ""})
    emit("NOTIFIED", doc["id"])
