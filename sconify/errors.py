"""The one exception hierarchy of sconify; each error carries a user-facing sentence and an exit code.

Library code raises these and never prints or exits; the command line maps them to exit codes in one
place (``sconify.cli``). The codes are documented in ``docs/exit-codes.md``.
"""

from __future__ import annotations


class SconifyError(Exception):
    """Base of every error sconify reports to a user: one sentence naming the thing and the way out."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(SconifyError):
    """An option or argument is malformed or contradicts another."""

    exit_code = 2


class BadReferenceError(SconifyError):
    """An image reference cannot be parsed or names an unknown transport."""

    exit_code = 3


class NotFoundError(SconifyError):
    """A file, image, tag, manifest or blob does not exist where the user said."""

    exit_code = 4


class AuthError(SconifyError):
    """A registry refused our credentials or demanded credentials we do not have."""

    exit_code = 5


class NetworkError(SconifyError):
    """A registry, daemon or service could not be reached or answered outside the protocol."""

    exit_code = 6


class IntegrityError(SconifyError):
    """Bytes do not match their digest, size, tag or signature: something was corrupted or tampered with."""

    exit_code = 7


class UnsafeArchiveError(SconifyError):
    """A layer archive tries to escape its root or is malformed (absolute path, '..', escaping link)."""

    exit_code = 8


class UnsupportedError(SconifyError):
    """The input is valid but outside what sconify supports (platform, media type, architecture)."""

    exit_code = 9


class KeyMaterialError(SconifyError):
    """A key is missing, unreadable, of the wrong kind or size, or protected by a wrong passphrase."""

    exit_code = 10


class ConversionError(SconifyError):
    """The image cannot be converted as asked (no command, a path to protect that does not exist)."""

    exit_code = 11


class DestinationError(SconifyError):
    """The destination refused the output (push denied, path not writable, already exists)."""

    exit_code = 12


class VerificationFailed(SconifyError):
    """A verification ran to the end and found the object not to be what it claims."""

    exit_code = 13

