"""Fixtures shared by the lab tests."""

from test_reach import reach  # noqa: F401  (the ReachLab factory fixture, for every lab test module)
