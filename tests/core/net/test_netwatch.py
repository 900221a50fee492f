"""The network watcher's pure parts: the default route from /proc/net/route, and what a change is."""

import asyncio

from spt.core.net.netwatch import NetWatcher, NetworkState, change_between, default_route

ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t010A0A0A\t0003\t0\t0\t100\t00000000\t0\t0\t0
"""


def test_the_default_route_with_the_lowest_metric_wins(tmp_path):
    routes = tmp_path / "route"
    routes.write_text(ROUTES)
    assert default_route(routes) == "10.10.10.1 dev eth0"
    routes.write_text(ROUTES.splitlines()[0] + "\n" + ROUTES.splitlines()[1] + "\n")
    assert default_route(routes) is None  # only a LAN route: no way out
    assert default_route(tmp_path / "missing") is None


def test_a_change_names_what_was_lost_and_gained_and_whether_paths_may_be_dead():
    home = NetworkState(("192.168.1.20",), "192.168.1.1 dev wlan0")
    cafe = NetworkState(("10.0.0.7",), "10.0.0.1 dev wlan0")
    assert change_between(home, home, 0.0) is None
    moved = change_between(home, cafe, 1.0)
    assert moved is not None and moved.moved and moved.lost == ("192.168.1.20",) and moved.gained == ("10.0.0.7",)
    assert "default route 192.168.1.1 dev wlan0 -> 10.0.0.1 dev wlan0" in moved.describe()
    docker = NetworkState(("192.168.1.20", "172.17.0.1"), "192.168.1.1 dev wlan0")
    added = change_between(home, docker, 2.0)
    assert added is not None and not added.moved  # an address appeared: nothing in use died


async def test_the_watcher_reports_each_change_once_and_ignores_loopback():
    addrs = ["127.0.0.1", "10.1.1.5"]
    seen = []
    watcher = NetWatcher(lambda: list(addrs), seen.append, poll_interval=3600)
    assert watcher.state.addresses == ("10.1.1.5",)
    assert watcher.check() is None
    addrs[1] = "10.2.2.5"
    change = watcher.check()
    assert change is not None and seen == [change] and change.lost == ("10.1.1.5",)
    assert watcher.check() is None and len(seen) == 1
    watcher.start()  # netlink where the kernel allows it, polling otherwise; stops cleanly
    await asyncio.sleep(0)
    await watcher.stop()
