"""The example plugin works across two nodes with no change to spt, and a node without it
refuses the type by name."""

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.root]  # creates subnets (elevated)


def test_location_reaches_an_endpoint_on_another_node(spt_node_pair):
    a, b = spt_node_pair
    listener = b.popen("ready", "scout")
    assert listener.stderr.readline().strip() == "READY:scout"
    try:
        def sent():
            result = a.cli("location", "send", "scout", "52.5", "13.4", "--label", "Berlin <HQ>")
            return result if result.returncode == 0 else None

        import time

        deadline = time.monotonic() + 15
        result = sent()
        while result is None and time.monotonic() < deadline:  # until scout's row reaches a
            time.sleep(0.2)
            result = sent()
        assert result is not None and result.stdout == "SENT:scout\n"
        line = listener.stdout.readline()
        assert line.startswith('<EVENT type="acme.location" from="')
        assert 'lat="52.500000" lon="13.400000">Berlin &lt;HQ&gt;</EVENT>' in line
    finally:
        listener.terminate()
        listener.wait(10)


def test_a_node_without_the_plugin_refuses_the_type_by_name(spt_nodes):
    a, b = spt_nodes.subnet(["alpha", "beta"])
    b.stop()
    b.env["SPT_DISABLE_PLUGINS"] = "location"
    b.start()
    listener = b.popen("ready", "scout")
    assert listener.stderr.readline().strip() == "READY:scout"
    listener.terminate()
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        result = a.cli("location", "send", "scout", "1", "2")
        if not result.stderr.startswith("NO_PERCH"):
            break
        time.sleep(0.2)
    assert result.returncode == 1
    assert result.stderr.startswith("UNKNOWN_PAYLOAD_TYPE:acme.location")
