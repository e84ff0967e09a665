"""Building the confidential image's layers: a header scan, per-layer rewriting with the file-system shield,
and the runtime layer."""
