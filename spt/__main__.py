"""`python -m spt` is the same as the `spt` command."""

from __future__ import annotations

from spt.cli import main

if __name__ == "__main__":
    main()
