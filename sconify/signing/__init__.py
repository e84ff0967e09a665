"""Image signatures in cosign's key-based format."""
