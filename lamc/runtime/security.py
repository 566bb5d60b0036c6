"""Transport security for stage servers: TLS (optionally mutual) and a shared token.

Binding anything but a loopback address requires TLS or an explicit `--insecure`. The
token, when set, travels as `authorization: Bearer <token>` and is compared in constant
time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamc.errors import UsageError

TOKEN_ENV = "LAMC_TOKEN"


@dataclass(frozen=True)
class TlsConfig:
    cert: bytes | None = None  # this side's certificate chain (PEM)
    key: bytes | None = None  # its private key (PEM)
    ca: bytes | None = None  # roots to verify the other side (PEM)
    require_client_cert: bool = False  # server: mutual TLS
    server_name: str | None = None  # client: the name to check in the server's certificate

    @classmethod
    def from_files(
        cls,
        cert: Path | None,
        key: Path | None,
        ca: Path | None,
        *,
        require_client_cert: bool = False,
        server_name: str | None = None,
    ) -> TlsConfig | None:
        if cert is None and key is None and ca is None:
            return None
        if (cert is None) != (key is None):
            raise UsageError("--tls-cert and --tls-key go together")
        if require_client_cert and ca is None:
            raise UsageError("--require-client-cert needs --tls-ca to verify client certificates")

        def read(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as exc:
                raise UsageError(f"{what} {path}: {exc.strerror}") from None

        config = cls(
            read(cert, "--tls-cert"),
            read(key, "--tls-key"),
            read(ca, "--tls-ca"),
            require_client_cert,
            server_name,
        )
        _check_pem(cert, key, ca)
        return config

    def server_credentials(self) -> Any:
        import grpc

        if self.cert is None or self.key is None:
            raise UsageError("a TLS server needs --tls-cert and --tls-key")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca,
            require_client_auth=self.require_client_cert,
        )

    def channel_credentials(self) -> Any:
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def host_of(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]")


def is_loopback(address: str) -> bool:
    host = host_of(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_pem(cert: Path | None, key: Path | None, ca: Path | None) -> None:
    """The certificate, its key and the CA load as PEM (a garbage file is a usage error
    naming it, not a failed bind later)."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, ValueError) as exc:
            raise UsageError(
                f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its private key "
                f"({getattr(exc, 'reason', None) or exc})"
            ) from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, ValueError) as exc:
            raise UsageError(f"--tls-ca {ca}: not a PEM certificate ({exc})") from None


def check_listen(address: str) -> None:
    """HOST:PORT with a port in 1..65535 (gRPC would quietly bind another one)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {address}: expected HOST:PORT with a port from 1 to 65535")


def check_bind(address: str, tls: TlsConfig | None, insecure: bool) -> None:
    """Refuse a plaintext listener reachable from other hosts unless asked to."""
    check_listen(address)
    if tls is None and not insecure and not is_loopback(address):
        raise UsageError(
            f"refusing to serve on {address} without TLS: other hosts could read and send tensors",
            hint="pass --tls-cert/--tls-key (and --tls-ca --require-client-cert for mutual TLS), or --insecure on a trusted network",
        )


def load_token(path: Path | None) -> str | None:
    """The shared token: from a file, else $LAMC_TOKEN, else none."""
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--token-file {path}: {exc.strerror}") from None
        if not token:
            raise UsageError(f"--token-file {path} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def token_matches(expected: str | None, metadata: Any) -> bool:
    if expected is None:
        return True
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return hmac.compare_digest(value[len("Bearer ") :].encode(), expected.encode())
    return False


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


# Clients and the previous stage ping a stage every KEEPALIVE_MS, even between requests, so
# a dead link is noticed; the server accepts pings twice as often as that.
KEEPALIVE_MS = 10_000

CHANNEL_OPTIONS = (
    # Reconnect quickly to a restarted stage.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


def server_options(max_message: int, keepalive_ms: int = KEEPALIVE_MS) -> list[tuple[str, Any]]:
    """A stage server's options: it accepts the keepalive pings its clients and the previous
    stage send, even between requests (gRPC's default answers pings more often than every
    5 minutes with GOAWAY too_many_pings and drops the connection)."""
    return [
        *channel_options(max_message, None, keepalive_ms),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", keepalive_ms // 2),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def channel_options(
    max_message: int, tls: TlsConfig | None, keepalive_ms: int = KEEPALIVE_MS
) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        *CHANNEL_OPTIONS,
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_ms // 2),
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def open_channel(address: str, tls: TlsConfig | None, max_message: int = 1 << 20) -> Any:
    """An asyncio gRPC channel to `address`: TLS (mutual, with a client certificate) when
    `tls` is given, plaintext otherwise; lamc's keepalive and message size options."""
    import grpc

    options = channel_options(max_message, tls)
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)
    return grpc.aio.insecure_channel(address, options=options)


def listen_on(server: Any, address: str, tls: TlsConfig | None) -> None:
    """Bind a gRPC server to `address`, with TLS when `tls` is given (exit 2 if the
    address is taken or not available)."""
    if tls is not None:
        port = server.add_secure_port(address, tls.server_credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise UsageError(f"cannot listen on {address} (address in use or not available)")
