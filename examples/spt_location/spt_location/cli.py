"""`spt location send ADDRESS LAT LON [--label TEXT]`."""

from __future__ import annotations

import click

from spt.cli._output import emit
from spt.cli._state import daemon_call


@click.group()
def location() -> None:
    """Send positions to endpoints (example plugin)."""


@location.command()
@click.argument("address")
@click.argument("lat", type=float)
@click.argument("lon", type=float)
@click.option("--label", default="", help="A name for the place.")
@click.option("--from", "sender", help="Sender identity.")
def send(address: str, lat: float, lon: float, label: str, sender: str | None) -> None:
    """Send a location to ADDRESS."""
    result = daemon_call(
        "payload.send",
        {"type": "acme.location", "address": address, "from": sender, "value": {"lat": lat, "lon": lon, "label": label}},
    )
    emit(result["token"], address)
