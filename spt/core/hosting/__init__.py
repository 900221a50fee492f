"""Hosted endpoints (SPEC.md §2.3, §4.6): a command in a PTY owned by a host process per endpoint.

- `wire`: the frames spoken on a host process's Unix socket (pure framing, asyncio helpers);
- `host`: the host process itself (`python -m spt.core.hosting.host SPEC`), which outlives the
  daemon and keeps the PTY, the output buffer and the per-viewer input counters;
- `service`: the daemon's side: start, adopt at daemon start, watch, suspend/wake, stop.
"""
