"""``python -m spt.testing.older ARGS…``: run ``spt ARGS…`` as a node older than the
`msg.deliver_batch` member request (issue 14): it answers that request as unknown, as any
node without the handler does, so its peers fall back to one `msg.deliver` per message. A fault
point for tests, kept out of product code (like `spt.testing.skew`)."""

from __future__ import annotations

import runpy
import sys

from spt.core import messaging
from spt.core.proto.deliver import BATCH_TYPE


def main() -> None:
    init = messaging.Messaging.__init__

    def older_init(self: messaging.Messaging, daemon: object) -> None:
        init(self, daemon)  # type: ignore[arg-type]
        del self.members.handlers[BATCH_TYPE]

    messaging.Messaging.__init__ = older_init  # type: ignore[method-assign]
    sys.argv = ["spt", *sys.argv[1:]]
    runpy.run_module("spt", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
