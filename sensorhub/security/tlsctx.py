"""The one TLS client context every MQTT client of the project uses.

The native driver, the paho driver (``tls_set_context``), the Sparkplug host's
connection, the simulator's publishing connections and its aiomqtt control
connection all build their :class:`ssl.SSLContext` here, so that they check
the broker the same way: TLS 1.2 or later, the broker's certificate must chain
to ``ca_file`` (or the system's CAs when none is given) and name the host we
dialled; a client certificate is presented when one is configured.
"""

from __future__ import annotations

import os
import ssl

__all__ = ["client_context"]

_PathLike = str | os.PathLike[str]


def client_context(
    ca_file: _PathLike | None = None,
    cert_file: _PathLike | None = None,
    key_file: _PathLike | None = None,
) -> ssl.SSLContext:
    """A client context: TLS 1.2+, hostname checked, certificate required.

    ``ca_file``: the CA certificates (PEM) the server's certificate must chain
    to; None: the system's default CAs. ``cert_file`` (and ``key_file``, or the
    key inside ``cert_file``): the client certificate chain to present.
    Raises :class:`OSError` / :class:`ssl.SSLError` for an unreadable or bad file.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname on, CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca_file is not None:
        ctx.load_verify_locations(cafile=os.fspath(ca_file))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None:
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file) if key_file is not None else None)
    elif key_file is not None:
        raise ValueError("a client key_file needs its cert_file")
    return ctx
