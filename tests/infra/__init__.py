"""Test infrastructure: real registries, a token issuer, a Docker engine and tiny images, for pytest.

The fixtures themselves live in ``infra.fixtures`` and are exported by ``tests/conftest.py``; the
modules here can also be used directly by tests that need a non-standard set-up (a second registry,
a user with fewer rights).
"""
