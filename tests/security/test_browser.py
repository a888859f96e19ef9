"""What a browser is told: security headers on every answer, logout only from the dashboard's own
page, /docs without any third-party script (docs/security.md#the-operator-network)."""

from __future__ import annotations

import re

import pytest

from tests.api.conftest import open_api

COOKIE = "maintctl_session"


def _logged_in(api) -> str:
    r = api.client.post(
        "/dashboard/login",
        data={"token": api.tokens["viewer"]},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    return r.cookies[COOKIE]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "null", "Sec-Fetch-Site": "same-site"},  # a sibling subdomain
    ],
)
def test_a_cross_site_form_cannot_log_the_user_out(api, headers):
    session = _logged_in(api)
    api.client.cookies.set(COOKIE, session)
    r = api.client.post("/dashboard/logout", headers=headers, follow_redirects=False)
    assert r.status_code == 403
    assert "set-cookie" not in r.headers
    assert api.client.get("/dashboard").status_code == 200  # still logged in


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
        # What a browser sends from our own page under Referrer-Policy: no-referrer.
        {"Origin": "null", "Sec-Fetch-Site": "same-origin"},
        {},  # curl
    ],
)
def test_logout_from_the_page_itself_still_works(api, headers):
    api.client.cookies.set(COOKIE, _logged_in(api))
    r = api.client.post("/dashboard/logout", headers=headers, follow_redirects=False)
    assert r.status_code == 303 and r.cookies.get(COOKIE) in (None, "")


@pytest.mark.parametrize(
    ("path", "role"),
    [
        ("/api/v1/jobs", "viewer"),
        ("/api/v1/hosts", "viewer"),
        ("/api/v1/tokens", "admin"),
        ("/api/v1/dashboard", "viewer"),
        ("/dashboard", "viewer"),
        ("/dashboard/panels", "viewer"),
        ("/healthz", None),
        ("/api/v1/jobs/999", "viewer"),  # a problem document
        ("/api/v1/jobs", None),  # a 401
        ("/dashboard/login", None),
    ],
)
def test_every_answer_carries_the_security_headers(api, path, role):
    r = api.get(path, role=role)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["cache-control"] == "no-store"


def test_a_413_from_the_body_limit_carries_them_too(api):
    r = api.post("/api/v1/jobs", content=b"x" * (2 * 1024 * 1024))
    assert r.status_code == 413
    assert r.headers["x-content-type-options"] == "nosniff"


def test_docs_load_nothing_from_another_site(api):
    page = api.client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert urls, page.text
    for url in urls:
        assert url.startswith("/"), f"/docs loads {url}"
        assert not url.startswith("//"), url
        if url != "/openapi.json":
            asset = api.client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 100, url
    assert api.client.get("/docs/assets/index.html").status_code == 404  # only what /docs needs
    assert api.client.get("/docs/assets/..%2F..%2F__init__.py").status_code == 404
    assert api.client.get("/redoc").status_code == 404  # ReDoc's page loads from a CDN: gone


def test_docs_can_be_turned_off(sqlite_url, test_driver):
    with open_api(sqlite_url, test_driver, docs=False) as api:
        assert api.client.get("/docs").status_code == 404
        assert api.client.get("/docs/assets/swagger-ui-bundle.js").status_code == 404
        assert api.client.get("/openapi.json").status_code == 200
