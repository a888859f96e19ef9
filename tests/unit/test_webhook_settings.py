"""[[webhooks]] and [server] metrics_allow: what the config file accepts and what it refuses."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from pydantic import ValidationError

from controller.settings import ServerSettings, Settings, WebhookConfig

KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()


def test_a_webhook_with_defaults_and_its_decoded_key():
    w = WebhookConfig(name="chat", url="https://hooks.example.org/maintctl", secret=SECRET)
    assert w.key == KEY
    assert w.events == ["job.*", "host.*"] and w.max_attempts == 8
    assert SECRET not in repr(w)


@pytest.mark.parametrize(
    ("secret", "fragment"),
    [
        (base64.b64encode(KEY).decode(), "must start with whsec_"),
        ("whsec_not*base64", "not valid base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "24 to 64 random bytes"),
    ],
)
def test_bad_secrets_are_refused(secret, fragment):
    with pytest.raises(ValidationError, match=fragment):
        WebhookConfig(name="w", url="https://x.example", secret=secret)


def test_only_http_urls_and_unique_names():
    with pytest.raises(ValidationError, match="http:// or https://"):
        WebhookConfig(name="w", url="file:///etc/passwd", secret=SECRET)
    hook = {"name": "w", "url": "https://x.example", "secret": SECRET}
    with pytest.raises(ValidationError, match="declared twice"):
        Settings(webhooks=[hook, hook])


def test_metrics_allow_takes_networks_and_addresses():
    s = ServerSettings(metrics_allow=["10.0.0.0/8", "::1"])
    assert ipaddress.ip_address("10.1.2.3") in s.metrics_allow[0]
    assert ipaddress.ip_address("::1") in s.metrics_allow[1]
    assert ServerSettings().metrics_allow == []
    with pytest.raises(ValidationError):
        ServerSettings(metrics_allow=["10.0.0.0/33"])
