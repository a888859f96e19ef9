"""TLS end to end (a test CA made here), the plain-HTTP refusal, and forwarded headers believed
only from trusted proxies (docs/security.md#tls-and-proxies)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import time

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.service import MAINTCTL, Service, host_block


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Authority:
    """A CA of this test's own, and server certificates it signs for 127.0.0.1."""

    def __init__(self, directory):
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("maintctl test CA"))
            .issuer_name(_name("maintctl test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cert_path, key_path) -> int:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("127.0.0.1"))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return int(cert.serial_number)


def _served_serial(port: int, ca) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


@pytest.fixture
def tls_service(tmp_path):
    ca = Authority(tmp_path)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    serial = ca.issue(cert, key)
    svc = Service(
        tmp_path,
        hosts=host_block("t1", "test:///default", sync_clock=False),
        server=f'tls_cert = "{cert}"\ntls_key = "{key}"',
        scheme="https",
    )
    svc.start(ca_file=str(ca.path))
    try:
        yield svc, ca, serial, (cert, key)
    finally:
        svc.stop()


def _cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "MAINTCTL_CA_FILE"} | (env_extra or {})
    return subprocess.run(
        [str(MAINTCTL), *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_the_cli_talks_tls_and_keeps_verifying(tls_service):
    svc, ca, _, _ = tls_service
    token = svc.token("viewer", "ci")
    ok = _cli(
        "jobs",
        "list",
        "--server",
        svc.url,
        "--token",
        token,
        env_extra={"MAINTCTL_CA_FILE": str(ca.path)},
    )
    assert ok.returncode == 0, ok.stderr
    unknown_ca = _cli("jobs", "list", "--server", svc.url, "--token", token)
    assert unknown_ca.returncode == 5, unknown_ca.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in unknown_ca.stderr and "Traceback" not in unknown_ca.stderr
    plain = _cli("jobs", "list", "--server", svc.url.replace("https", "http"), "--token", token)
    assert plain.returncode == 5  # no plain-HTTP answer on the TLS port


def test_the_session_cookie_is_secure_under_tls(tls_service):
    svc, ca, _, _ = tls_service
    token = svc.token("viewer", "browser")
    with httpx.Client(
        base_url=svc.url, verify=ssl.create_default_context(cafile=str(ca.path))
    ) as c:
        r = c.post("/dashboard/login", data={"token": token}, follow_redirects=False)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie


def test_sighup_serves_a_renewed_certificate(tls_service):
    svc, ca, first, (cert, key) = tls_service
    assert _served_serial(svc.port, ca.path) == first
    renewed = ca.issue(cert, key)
    svc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while _served_serial(svc.port, ca.path) != renewed:
        assert time.monotonic() < deadline, "the renewed certificate is not served"
        time.sleep(0.1)
    assert svc.proc.poll() is None  # SIGHUP reloads, it does not stop the service


@pytest.mark.parametrize(
    ("server", "refused"),
    [
        ('bind = "0.0.0.0:18443"', True),
        ('bind = "192.0.2.1:18443"', True),
        ('bind = "0.0.0.0:18443"\nallow_plain_http = true', False),
        ('bind = "127.0.0.1:18443"', False),
        ('bind = "0.0.0.0:18443"\ntls_cert = "/c.pem"', True),  # without its key
    ],
)
def test_a_non_loopback_plain_http_bind_is_refused(tmp_path, server, refused):
    config = tmp_path / "maintctl.toml"
    config.write_text(f"[server]\n{server}\n")
    r = _cli("config", "check", "--config", str(config))
    assert (r.returncode != 0) == refused, r.stderr
    if refused:
        assert "server" in r.stderr and "Traceback" not in r.stderr


def test_bad_certificate_files_are_one_paragraph(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    config = tmp_path / "maintctl.toml"
    config.write_text(
        f'[server]\nbind = "127.0.0.1:18444"\ntls_cert = "{tmp_path}/cert.pem"\n'
        f'tls_key = "{tmp_path}/key.pem"\n[database]\nurl = "sqlite:///{tmp_path}/m.db"\n'
        f'journal_path = "{tmp_path}/m.journal"\n'
    )
    r = _cli("serve", "--config", str(config))
    assert r.returncode == 2 and "tls_cert" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def metrics_service(tmp_path):
    svc = Service(
        tmp_path,
        hosts=host_block("t1", "test:///default", sync_clock=False),
        server='metrics_allow = ["10.0.5.20/32"]',
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def test_a_forged_x_forwarded_for_does_not_pass_metrics_allow(metrics_service):
    url = f"{metrics_service.url}/metrics"
    for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
        value = "10.0.5.20" if header != "Forwarded" else "for=10.0.5.20"
        r = httpx.get(url, headers={header: value}, timeout=5)
        assert r.status_code == 401, (header, r.status_code)


def test_a_trusted_proxy_is_believed(tmp_path):
    svc = Service(
        tmp_path,
        hosts=host_block("t1", "test:///default", sync_clock=False),
        server='metrics_allow = ["10.0.5.20/32"]\ntrusted_proxies = ["127.0.0.1/32"]',
    )
    svc.start()
    try:
        url = f"{svc.url}/metrics"
        assert (
            httpx.get(url, headers={"X-Forwarded-For": "10.0.5.20"}, timeout=5).status_code == 200
        )
        assert (
            httpx.get(url, headers={"X-Forwarded-For": "10.0.5.21"}, timeout=5).status_code == 401
        )
        assert httpx.get(url, timeout=5).status_code == 401  # the proxy itself is not allowed
    finally:
        svc.stop()
