"""spt: zero-config connectivity between one person's machines, for the agents on them."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
