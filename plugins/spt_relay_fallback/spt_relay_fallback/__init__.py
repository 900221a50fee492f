"""spt-relay-fallback: the relay connector, `spt relay`, and relay rendezvous.

An air-gapped build is spt without this distribution; nothing in spt imports it.
"""
