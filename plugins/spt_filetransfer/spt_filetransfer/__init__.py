"""spt-filetransfer: the `file` payload type and `spt file`."""
