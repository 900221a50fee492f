"""Who is asking, for the duration of one control operation (system mode, SPEC.md §5.7).

In system mode the daemon runs under its own account and serves every uid of the socket's group;
each uid sees and uses only the perches it made. The daemon sets `CALLER_UID` while it runs an
operation for such a caller; perch look-ups consult `may_use`. Peers' requests and background
work run with no caller, unrestricted. In user mode nothing is ever restricted.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from typing import Final

CALLER_UID: Final[ContextVar[int | None]] = ContextVar("spt_caller_uid", default=None)


def restricted_uid() -> int | None:
    """The uid the current operation is restricted to; None when unrestricted (root, peers, user mode)."""
    uid = CALLER_UID.get()
    return None if uid is None or uid == 0 else uid


def may_use(owner: int | None) -> bool:
    """True when the current caller may see and use a perch owned by `owner` (None: the daemon's
    own account, which made every perch before system mode was turned on)."""
    uid = restricted_uid()
    return uid is None or uid == (owner if owner is not None else os.getuid())
