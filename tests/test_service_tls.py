# Over 400 lines for a reason: the TLS tests share their generated certificates.
"""TLS between the service and its clients, and the refusal of plaintext off loopback.

Certificates are made here with `cryptography`: a CA, a service certificate it signed
for "localhost" and 127.0.0.1, a client certificate it signed, and a rogue CA with a
client certificate of its own. Servers are real, on loopback port 0.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from precond_service.__main__ import main as service_main
from precond_service.client import process
from precond_service.client.service_client import PreconditionerClient, wait_for_serving
from precond_service.common.auth import TlsConfig, read_pem, server_credentials
from precond_service.common.blocks import StatisticsBlock
from precond_service.server.server import RunningServer, serve
from precond_service.server.service_records import ServiceConfig
from precond_service.status import fetch_status
from precond_service.status import main as status_main
from tests.conftest import eigh_inverse_root, random_statistic, subprocess_env, wait_until
from trainer import config as config_lib

FAST = {"pull_interval_s": 0.02, "backoff_initial_s": 0.02, "backoff_max_s": 0.2}
TOKEN = "tls-test-token-7f3a"


@dataclasses.dataclass(frozen=True)
class Pki:
    """Paths of the PEM files the tests use."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_ca: str
    rogue_client_cert: str
    rogue_client_key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A certificate of `key` signed by `issuer` (certificate, key), or self-signed."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def _write(directory: pathlib.Path, name: str, pem: bytes) -> str:
    path = directory / name
    path.write_bytes(pem)
    return str(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Writes a CA, a service and a client certificate it signed, and a rogue pair."""
    directory = tmp_path_factory.mktemp("pki")
    ca_extensions = [(x509.BasicConstraints(ca=True, path_length=None), True)]
    files = {}
    issuers = {}
    for ca_name in ("ca", "rogue_ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _certificate(f"test {ca_name}", key, None, ca_extensions)
        issuers[ca_name] = (certificate, key)
        files[ca_name] = _write(directory, f"{ca_name}.pem", _cert_pem(certificate))
    leaf = [(x509.BasicConstraints(ca=False, path_length=None), True)]
    server_san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    server_usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    client_usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    for name, issuer, extensions in (
        ("server", "ca", leaf + [(server_san, False), (server_usage, False)]),
        ("client", "ca", leaf + [(client_usage, False)]),
        ("rogue_client", "rogue_ca", leaf + [(client_usage, False)]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _certificate(name, key, issuers[issuer], extensions)
        files[f"{name}_cert"] = _write(directory, f"{name}.pem", _cert_pem(certificate))
        files[f"{name}_key"] = _write(directory, f"{name}.key", _key_pem(key))
    return Pki(**files)


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[RunningServer]:
    """An in-process service over TLS, without client certificates or a token."""
    credentials = server_credentials(
        read_pem(pki.server_cert, "cert"), read_pem(pki.server_key, "key")
    )
    server = serve(ServiceConfig(workers=1), host="127.0.0.1", port=0, credentials=credentials)
    yield server
    server.stop(grace_s=0.5)


class ServiceProcess:
    """`python -m precond_service`, started by `precond_service.client.process`, logged."""

    def __init__(self, service: process.ServiceProcess) -> None:
        self.service = service
        self.process = service.process

    @classmethod
    def start(cls, directory: pathlib.Path, flags: list[str]) -> ServiceProcess:
        host = next((f.split("=", 1)[1] for f in flags if f.startswith("--host=")), "127.0.0.1")
        other = [f for f in flags if not f.startswith("--host=")]
        # No health check: a TLS service needs the test's client certificate for it.
        service = process.start_service(
            other, host=host, log_path=directory / "service.log", check_health=False
        )
        return cls(service)

    def address(self) -> str:
        """ "127.0.0.1:PORT" (the service has written its port)."""
        return self.service.address

    def log(self) -> str:
        return pathlib.Path(self.service.log_path).read_text()

    def stop(self) -> int:
        """SIGTERMs the service (SIGKILL after 30 s); returns its exit status."""
        return self.service.stop(timeout_s=30.0)


@pytest.fixture(scope="module")
def mutual_tls_service(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """`python -m precond_service` on all interfaces, TLS with client certificates and a token."""
    directory = tmp_path_factory.mktemp("mutual")
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    service = ServiceProcess.start(
        directory,
        [
            "--host=0.0.0.0",
            f"--tls_cert={pki.server_cert}",
            f"--tls_key={pki.server_key}",
            f"--tls_client_ca={pki.ca}",
            f"--token_file={token_file}",
        ],
    )
    yield service
    assert service.stop() == 0, service.log()


# a. Plaintext off loopback: refused unless --insecure.


def test_non_loopback_host_without_tls_is_refused_before_binding(tmp_path: pathlib.Path) -> None:
    port_file = tmp_path / "port"
    result = subprocess.run(
        [sys.executable, "-m", "precond_service", "--host=0.0.0.0", f"--port_file={port_file}"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert result.returncode == 1
    assert "refusing to listen on 0.0.0.0 without TLS" in result.stderr
    for flag in ("--tls_cert", "--tls_key", "--insecure"):
        assert flag in result.stderr
    assert "precond_service listening" not in result.stderr
    assert not port_file.exists()


def test_insecure_serves_plaintext_off_loopback_with_a_warning(tmp_path: pathlib.Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    service = ServiceProcess.start(
        tmp_path, ["--host=0.0.0.0", "--insecure", f"--token_file={token_file}"]
    )
    try:
        assert wait_for_serving(service.address(), timeout_s=10)
    finally:
        status = service.stop()
    log = service.log()
    assert status == 0, log
    assert "WARNING" in log and "without TLS (--insecure)" in log
    assert "(plaintext, workers=1" in log
    assert TOKEN not in log


# b. Flags that do not go together, and files that cannot be read.


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls_cert={cert}"], "--tls_cert needs --tls_key"),
        (["--tls_key={key}"], "--tls_key needs --tls_cert"),
        (["--tls_client_ca={ca}"], "--tls_client_ca needs --tls_cert and --tls_key"),
        (["--tls_cert={missing}", "--tls_key={key}"], "--tls_cert '{missing}' cannot be read"),
        (["--tls_cert={cert}", "--tls_key={ca_dir}"], "--tls_key '{ca_dir}' cannot be read"),
        (["--tls_cert={cert}", "--tls_key={key}", "--tls_client_ca={token}"], "is not a PEM"),
    ],
    ids=["cert-without-key", "key-without-cert", "client-ca-alone", "missing", "dir", "not-pem"],
)
def test_tls_flag_errors_exit_1_naming_flag_and_file(
    pki: Pki,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
    flags: list[str],
    message: str,
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    paths = {
        "cert": pki.server_cert,
        "key": pki.server_key,
        "ca": pki.ca,
        "missing": str(tmp_path / "missing.pem"),
        "ca_dir": str(tmp_path),
        "token": str(token),
    }
    argv = ["--port=0", *(flag.format(**paths) for flag in flags)]
    assert service_main(argv) == 1
    assert message.format(**paths) in caplog.text
    assert TOKEN not in caplog.text


# c. A TLS service: clients with the CA use it; plaintext and strangers get nothing.


def test_tls_client_round_trip(pki: Pki, tls_server: RunningServer) -> None:
    tls = TlsConfig(pki.ca)
    assert wait_for_serving(tls_server.address, timeout_s=10, tls=tls)
    matrix = random_statistic(8, seed=1)
    with PreconditionerClient(tls_server.address, "round-trip", tls=tls, **FAST) as client:
        client.push([StatisticsBlock("k", 1, 2, matrix)])
        assert wait_until(lambda: "k" in client.latest(), 30), client.status()
        root = client.latest()["k"]
        assert client.status().push_failures == 0
        assert client.drop_run() == 1  # drop_run's own channel is TLS too.
    np.testing.assert_allclose(root.root, eigh_inverse_root(matrix, 2, 1e-6), rtol=1e-4, atol=1e-7)


def test_tls_status_command(
    pki: Pki, tls_server: RunningServer, capsys: pytest.CaptureFixture
) -> None:
    assert status_main(["--address", tls_server.address, "--tls_ca", pki.ca, "--json"]) == 0
    assert '"workers": 1' in capsys.readouterr().out
    assert status_main(["--address", tls_server.address, "--timeout_s=1"]) == 1
    assert "could not get the status" in capsys.readouterr().err


def test_plaintext_client_gets_nothing_from_a_tls_service(tls_server: RunningServer) -> None:
    client = PreconditionerClient(tls_server.address, "plaintext", **FAST)
    with client:
        client.push([StatisticsBlock("k", 1, 2, random_statistic(8, seed=2))])
        assert wait_until(lambda: client.status().push_failures >= 2, 10), client.status()
        assert wait_until(lambda: client.status().pull_failures >= 1, 10)
        status = client.status()
        assert client.latest() == {}
        assert not status.connected and status.pushes_sent == 0
        with pytest.raises(grpc.RpcError) as error:
            client.drop_run(timeout_s=1)
        assert error.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
    assert not wait_for_serving(tls_server.address, timeout_s=1)


def test_service_certificate_from_another_ca_is_not_trusted(
    pki: Pki, tls_server: RunningServer
) -> None:
    assert not wait_for_serving(tls_server.address, timeout_s=1, tls=TlsConfig(pki.rogue_ca))
    with pytest.raises(grpc.RpcError):
        fetch_status(tls_server.address, tls=TlsConfig(pki.rogue_ca), timeout_s=1)


# d. and e. --tls_client_ca: a client certificate signed by that CA, and the token over TLS.


def test_client_certificate_is_required(pki: Pki, mutual_tls_service: ServiceProcess) -> None:
    address = mutual_tls_service.address()
    with_certificate = TlsConfig(pki.ca, pki.client_cert, pki.client_key)
    assert wait_for_serving(address, timeout_s=10, tls=with_certificate)
    assert fetch_status(address, token=TOKEN, tls=with_certificate).workers == 1
    for tls in (
        TlsConfig(pki.ca),
        TlsConfig(pki.ca, pki.rogue_client_cert, pki.rogue_client_key),
    ):
        with pytest.raises(grpc.RpcError) as error:
            fetch_status(address, token=TOKEN, tls=tls, timeout_s=2)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, tls


def test_wrong_token_over_tls_is_unauthenticated(
    pki: Pki, mutual_tls_service: ServiceProcess
) -> None:
    address = mutual_tls_service.address()
    tls = TlsConfig(pki.ca, pki.client_cert, pki.client_key)
    assert wait_for_serving(address, timeout_s=10, tls=tls)
    for token in ("wrong", None):
        with pytest.raises(grpc.RpcError) as error:
            fetch_status(address, token=token, tls=tls, timeout_s=5)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_mutual_tls_service_logs_tls_and_never_the_token(
    pki: Pki, mutual_tls_service: ServiceProcess
) -> None:
    address = mutual_tls_service.address()
    port = address.rsplit(":", 1)[1]
    assert wait_until(lambda: "precond_service listening" in mutual_tls_service.log(), 30)
    tls = TlsConfig(pki.ca, pki.client_cert, pki.client_key)
    with pytest.raises(grpc.RpcError):
        fetch_status(address, token="guessed-token-1234", tls=tls, timeout_s=5)
    # A refused token is counted and logged (the audit), without the token.
    assert fetch_status(address, token=TOKEN, tls=tls).auth_rejected >= 1
    assert wait_until(lambda: "with a missing or wrong token" in mutual_tls_service.log(), 30)
    log = mutual_tls_service.log()
    assert f"precond_service listening on 0.0.0.0:{port} (TLS," in log
    assert f"clients must present a TLS certificate signed by {pki.ca}" in log
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert all("with a missing or wrong token" in line for line in warnings), warnings
    assert TOKEN not in log and "guessed-token-1234" not in log


# f. The trainer's TLS fields, and TlsConfig's own checks.


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_cert_file": "c.pem"}, "tls_cert_file and config.precond.tls_key_file go together"),
        ({"tls_key_file": "k.pem"}, "tls_cert_file and config.precond.tls_key_file go together"),
        (
            {"tls_cert_file": "c.pem", "tls_key_file": "k.pem", "address": "h:1"},
            "config.precond.tls_cert_file needs config.precond.tls_ca_file",
        ),
        ({"tls_ca_file": "ca.pem"}, "config.precond.tls_ca_file needs config.precond.address"),
    ],
    ids=["cert-without-key", "key-without-cert", "cert-without-ca", "ca-without-address"],
)
def test_trainer_config_checks_tls_fields(fields: dict[str, str], message: str) -> None:
    config = config_lib.default_config()
    config.precond.update(fields)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_trainer_config_accepts_tls_fields_together() -> None:
    config = config_lib.default_config()
    config.precond.update(
        address="cpuhost:50051",
        tls_ca_file="ca.pem",
        tls_cert_file="client.pem",
        tls_key_file="client.key",
    )
    config_lib.validate(config)


def test_tls_config_reads_its_files_up_front(pki: Pki, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="cert_file and key_file together"):
        TlsConfig(pki.ca, cert_file=pki.client_cert)
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match=f"TLS CA file '{missing}' cannot be read"):
        TlsConfig(missing)
    tls = TlsConfig(pki.ca, pki.client_cert, pki.client_key)
    assert "PRIVATE KEY" not in repr(tls)
