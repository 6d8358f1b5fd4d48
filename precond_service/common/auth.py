"""Secrets: where the service, its clients and the trainer read them from, and their channels.

Two independent protections, each optional. The shared token (`read_token`) says who
may use the service; TLS (`server_credentials` on the service, `TlsConfig` and
`open_channel` on its clients) encrypts the channel and proves the service's
identity, and with a client CA also the client's.

Between clients holding the token, a run's roots are readable only with its run_id,
so the service never shows a run_id: its status and logs name a run by `run_digest`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
import string
from collections.abc import Sequence

import grpc

TOKEN_ENV = "PRECOND_SERVICE_TOKEN"


def run_digest(run_id: str) -> str:
    """The name under which the service shows a run: 12 hex digits of SHA-256(run_id).

    It tells runs apart without revealing their run_ids (from which it cannot be
    computed back); a run_id that can be guessed is as readable as the digest lets
    one confirm a guess, so give runs that must stay private an unguessable run_id.

    Args:
        run_id: The run.

    Returns:
        The first 12 hex digits of the SHA-256 of its UTF-8 bytes.
    """
    return hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def read_token(token_file: str | None) -> str | None:
    """The token in `token_file`, else $PRECOND_SERVICE_TOKEN; None when neither is set.

    Raises:
        OSError: `token_file` is given but cannot be read.
    """
    if token_file:
        return pathlib.Path(token_file).read_text().strip() or None
    return os.environ.get(TOKEN_ENV) or None


def read_pem(path: str, name: str) -> bytes:
    """The contents of a PEM file (certificates or a private key).

    Args:
        path: The file.
        name: What the caller calls it (a flag or a field), for error messages.

    Returns:
        The file's bytes.

    Raises:
        ValueError: The file cannot be read or holds no PEM block.
    """
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{name} {path!r} cannot be read: {e.strerror or e}") from e
    if b"-----BEGIN " not in data:
        raise ValueError(f"{name} {path!r} is not a PEM file (no '-----BEGIN ' line)")
    return data


def server_credentials(
    certificate_chain: bytes, private_key: bytes, client_ca: bytes | None = None
) -> grpc.ServerCredentials:
    """TLS credentials for the service (see `read_pem` for reading the files).

    Args:
        certificate_chain: PEM certificate of the service, then any intermediates.
        private_key: PEM private key of that certificate.
        client_ca: PEM CA certificates; when given, every client must present a
            certificate signed by one of them.

    Returns:
        Credentials for `serve(..., credentials=...)`.
    """
    return grpc.ssl_server_credentials(
        [(private_key, certificate_chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """What a client needs to reach a TLS service; the files are read when it is made.

    Attributes:
        ca_file: PEM CA certificates the service's certificate must be signed by.
        cert_file: PEM certificate of this client, for a service that requires one
            (`--tls_client_ca`); "" for none.
        key_file: PEM private key of `cert_file`; "" for none.
    """

    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    _ca: bytes = dataclasses.field(init=False, repr=False, compare=False)
    _cert: bytes | None = dataclasses.field(init=False, repr=False, compare=False)
    _key: bytes | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Reads the files.

        Raises:
            ValueError: `ca_file` is empty, only one of `cert_file` and `key_file`
                is given, or a file cannot be read.
        """
        if not self.ca_file:
            raise ValueError(
                "TlsConfig needs ca_file: the CA that signed the service's certificate"
            )
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError(
                "TlsConfig needs cert_file and key_file together, got "
                f"cert_file={self.cert_file!r} and key_file={self.key_file!r}"
            )
        object.__setattr__(self, "_ca", read_pem(self.ca_file, "TLS CA file"))
        cert = read_pem(self.cert_file, "TLS certificate file") if self.cert_file else None
        key = read_pem(self.key_file, "TLS key file") if self.key_file else None
        object.__setattr__(self, "_cert", cert)
        object.__setattr__(self, "_key", key)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The gRPC credentials for a channel to the service."""
        return grpc.ssl_channel_credentials(
            root_certificates=self._ca, private_key=self._key, certificate_chain=self._cert
        )


def open_channel(
    address: str, options: Sequence[tuple[str, int | str]], tls: TlsConfig | None
) -> grpc.Channel:
    """Opens a channel to the service: TLS with `tls`, plaintext without.

    Args:
        address: "host:port"; with TLS, the service's certificate must name this host.
        options: gRPC channel options.
        tls: The client's TLS settings, or None for a plaintext channel.

    Returns:
        The channel (a context manager that closes it).
    """
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


# Fewest bits of entropy a user-chosen run id must be able to hold (a trainer's
# precond.run_id): its run id is the key to a run's preconditioners.
MIN_RUN_ID_BITS = 128

# Character sets, smallest first, by which a run id's entropy is bounded.
_RUN_ID_ALPHABETS = (
    string.digits,
    string.digits + "abcdef",
    string.digits + string.ascii_lowercase + "-_.",
    string.digits + string.ascii_letters + "-_.",
)


def run_id_bits(run_id: str) -> float:
    """An upper bound of a run id's entropy: its length times log2 of its alphabet's size.

    The alphabet is the smallest of digits, hex digits, lowercase with digits and
    "-_.", letters with digits and "-_.", or else all printable characters.
    A bound only: a long but guessable id ("my-experiment-...") passes.
    """
    alphabet = next((a for a in _RUN_ID_ALPHABETS if set(run_id) <= set(a)), string.printable)
    return len(run_id) * math.log2(len(alphabet))
