"""TLS of the balancer: its traffic listener, and its connections to https:// backends.

- The listener serves HTTPS with `--tls-cert-file` (the certificate chain, PEM) and
  `--tls-key-file`: TLS 1.2 at least, HTTP/1.1 by ALPN.
- Backends given as https:// are verified: their chain against `--backend-ca-file` (a
  CA bundle, PEM) or the system's store, and their name against the URL's host. There is
  no switch to turn verification off.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Protocol


class TLSSettings(Protocol):
    tls_cert_file: Path | None
    tls_key_file: Path | None
    backend_ca_file: Path | None


class TLSError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def server_context(settings: TLSSettings) -> ssl.SSLContext | None:
    """The listener's TLS context, or None to serve plain HTTP."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as err:
        raise TLSError(
            f"cannot use certificate {settings.tls_cert_file} with key "
            f"{settings.tls_key_file}: {getattr(err, 'strerror', None) or err}"
        ) from None
    return context


def client_context(settings: TLSSettings) -> ssl.SSLContext:
    """The context https:// backends are reached with: verified chain and host name."""
    ca = settings.backend_ca_file
    try:
        # With a bundle, only its CAs are trusted; without, the system's.
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=None if ca is None else str(ca)
        )
    except (OSError, ssl.SSLError) as err:
        raise TLSError(
            f"cannot read CA bundle {ca}: {getattr(err, 'strerror', None) or err}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context
