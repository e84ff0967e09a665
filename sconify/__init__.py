"""sconify: turn a native container image into a confidential SCONE image for Intel SGX."""

__version__ = "0.1.0"
