import pytest


def pytest_collection_modifyitems(items):
    # netns tests need root, ip and iptables; they skip (never fail) without them.
    from spt.testing.netns import available

    ok, why = available()
    if not ok:
        for item in items:
            if "netns" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=why))
