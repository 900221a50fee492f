"""The `acme.location` payload type: a position handed to an endpoint as an envelope.

Third-party wire names are dotted. The receiving node runs `handle`, which delivers
`<EVENT type="acme.location" from="…" lat="…" lon="…">label</EVENT>` to the addressed perch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from spt.core.errors import RemoteProtocolError
from spt.hooks import CommandRef, IncomingPayload, PayloadContext, PayloadType, Registry, hookimpl


class Location(PayloadType):
    name: ClassVar[str] = "acme.location"
    version: ClassVar[int] = 1
    summary: ClassVar[str] = "a latitude/longitude with a label"

    @classmethod
    def encode(cls, value: Any) -> Any:
        lat, lon, label = value["lat"], value["lon"], value.get("label", "")
        return {"lat": float(lat), "lon": float(lon), "label": str(label)}

    @classmethod
    def decode(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise RemoteProtocolError(cls.name, "a location is a map")
        lat, lon = data.get("lat"), data.get("lon")
        if not isinstance(lat, float) or not isinstance(lon, float) or not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise RemoteProtocolError(cls.name, "lat and lon are floats in range")
        return {"lat": lat, "lon": lon, "label": str(data.get("label", ""))[:200]}

    @classmethod
    async def handle(cls, ctx: PayloadContext, payload: IncomingPayload) -> Mapping[str, Any]:
        value = payload.value
        attrs = [("lat", f"{value['lat']:.6f}"), ("lon", f"{value['lon']:.6f}")]
        token = await ctx.deliver(payload.perch, cls.name, value["label"], attrs, sender=payload.sender_form)
        return {"token": token}


@hookimpl
def spt_register_payload_types(registry: Registry[type[PayloadType]]) -> None:
    registry.add(Location)


@hookimpl
def spt_register_commands(registry: Registry[CommandRef]) -> None:
    registry.add(CommandRef("location", "spt_location.cli:location", "send a location to an endpoint"))
