"""Click options shared by several commands (platform, registry credentials and TLS)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from sconify.image.model import Platform
from sconify.image.reference import Reference, parse_reference
from sconify.image.transports import TransportOptions


def platform_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        default=None,
        help="Platform to choose from a multi-platform image (default linux/amd64).",
    )(f)


def transport_options(prefix: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Credentials and TLS options; ``prefix`` is ``src-`` or ``dest-`` for commands with two references."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        name = prefix.replace("-", "_")
        f = click.option(
            f"--{prefix}creds",
            f"{name}creds",
            metavar="USER[:PASSWORD]",
            default=None,
            help="Registry credentials (default: from $DOCKER_CONFIG/config.json or ~/.docker/config.json).",
        )(f)
        f = click.option(
            f"--{prefix}authfile",
            f"{name}authfile",
            type=click.Path(dir_okay=False),
            default=None,
            help="A docker config.json to take registry credentials from.",
        )(f)
        f = click.option(
            f"--{prefix}tls-verify/--{prefix}no-tls-verify",
            f"{name}tls_verify",
            default=None,
            help="Require HTTPS with a verified certificate (default: yes, except registries on loopback).",
        )(f)
        f = click.option(
            f"--{prefix}cert-dir",
            f"{name}cert_dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Directory with *.crt CA certificates and *.cert/*.key client certificates, as skopeo's.",
        )(f)
        f = click.option(
            f"--{prefix}daemon-host",
            f"{name}daemon_host",
            metavar="URL",
            default=None,
            help="Docker engine for docker-daemon: references (default: $DOCKER_HOST or the local socket).",
        )(f)
        return f

    return decorate


def make_transport_options(
    creds: str | None,
    authfile: str | None,
    tls_verify: bool | None,
    daemon_host: str | None = None,
    cert_dir: str | None = None,
) -> TransportOptions:
    return TransportOptions(
        creds=creds, authfile=authfile, tls_verify=tls_verify, daemon_host=daemon_host, cert_dir=cert_dir
    )


def parse_platform(text: str | None) -> Platform | None:
    return Platform.parse(text) if text else None


def reference_argument(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.argument(name, metavar=name.upper())


def parse_ref(text: str) -> Reference:
    return parse_reference(text)
