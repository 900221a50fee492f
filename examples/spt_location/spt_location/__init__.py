"""spt-location: an example of a third-party payload type, written only against `spt.hooks`."""
