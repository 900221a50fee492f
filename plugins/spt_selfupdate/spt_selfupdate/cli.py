"""`spt update status|fetch|apply|auto`: thin commands over the daemon's `update.*` operations.

Tokens (SPEC.md §3.8): STAGED / UP_TO_DATE / APPLIED / AUTO_UPDATE on stdout; VERIFY_FAILED,
NOTHING_STAGED and APPLY_FAILED are refusals (stderr, exit 1), raised and printed by the
dispatcher.
"""

from __future__ import annotations

import os
import time
from typing import Any, Final

import click

from spt.cli._output import emit, out, print_json
from spt.cli._state import daemon_call, require_elevation, state
from spt.core.errors import DaemonDown, Refusal, SptError, UsageError

APPLY_WAIT: Final = 60.0  # seconds to wait for the new daemon's verdict (the watchdog allows 30)


@click.group("update", epilog="\b\nExamples:\n  spt update status\n  spt update fetch --file spt-0.2.0.sptupdate\n  sudo spt update apply --yes\n")
def update() -> None:
    """Signed releases: status, fetch (from a source, a bundle file or members), apply."""


@update.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """The running version, the staged release, the apply policy and the source."""
    doc = daemon_call("update.status")
    if as_json or state(ctx).json:
        print_json(doc)
        return
    out(f"CURRENT: {doc['current']}")
    staged = doc.get("staged")
    out(f"STAGED: {staged['version']} ({staged['signed_by']}, from {staged['source']})" if staged else "STAGED: none")
    out(f"POLICY: {doc['policy']}")
    out(f"SOURCE: {doc.get('source') or 'none'}")
    last = doc.get("last_apply")
    if last and last.get("outcome") == "failed":
        out(f"LAST_APPLY: {last['version']} failed ({last['reason']}); kept {last['previous']}")


@update.command("fetch")
@click.option("--from", "source", metavar="URL", help="A release source (folder, file:// or http(s):// URL).")
@click.option("--file", "bundle", metavar="BUNDLE", type=click.Path(dir_okay=False, exists=True),
              help="An offline bundle (spt-<v>.sptupdate); what an air-gapped site uses.")
def fetch(source: str | None, bundle: str | None) -> None:
    """Fetch the newest release, verify it and stage it: STAGED, UP_TO_DATE or VERIFY_FAILED."""
    if source and bundle:
        raise UsageError("BAD_USAGE", "", "give --from or --file, not both")
    args: dict[str, Any] = {"from": source, "file": os.path.abspath(bundle) if bundle else None}
    doc = daemon_call("update.fetch", args, timeout=None)
    emit(str(doc["token"]), str(doc["version"]))


@update.command("apply")
@click.option("--yes", is_flag=True, help="Do not ask (the command itself is the consent).")
def apply(yes: bool) -> None:
    """Install the staged release into a new environment, switch to it and restart the daemon;
    switched back (APPLY_FAILED) if the new daemon fails its self-check within 30 s."""
    require_elevation()
    doc = daemon_call("update.apply", {}, timeout=None)
    version, previous = str(doc["version"]), str(doc["previous"])
    outcome = _wait_for_verdict(version)
    if outcome is None:
        raise Refusal("APPLY_FAILED", "no-answer", f"(kept {previous}?) the daemon did not come back; see daemon.log")
    if outcome.get("outcome") == "applied":
        emit("APPLIED", version)
        return
    raise Refusal("APPLY_FAILED", "self-check", f"(kept {outcome.get('previous') or previous}): {outcome.get('reason')}")


def _wait_for_verdict(version: str) -> dict[str, Any] | None:
    """Poll the restarting daemon (never autostarting one) until the watchdog decided."""
    from spt.core.ipc import call, connect
    from spt.core.paths import StatePaths

    socket_path = StatePaths.resolve().socket
    deadline = time.monotonic() + APPLY_WAIT
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            conn = connect(socket_path)
        except DaemonDown:
            continue
        try:
            doc = call(conn, "update.status", {}, timeout=5.0)
        except (SptError, OSError, ValueError):
            continue
        finally:
            conn.close()
        last = doc.get("last_apply") if isinstance(doc, dict) else None
        if last and last.get("version") == version and last.get("outcome") in ("applied", "failed"):
            return dict(last)
    return None


@update.command("auto")
@click.argument("mode", type=click.Choice(["on", "off"]))
def auto(mode: str) -> None:
    """Apply staged releases without asking (on), or only with `spt update apply` (off)."""
    require_elevation()
    doc = daemon_call("update.auto", {"on": mode == "on"})
    emit("AUTO_UPDATE", "on" if doc["policy"] == "auto" else "off")
