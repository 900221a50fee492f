"""spt-selfupdate: signed, staged, peer-propagated self-update and `spt update`."""
