"""Unknown paths: a browser (Accept: text/html) gets the HTML 404 page, API clients keep the
JSON error (api/errors.py `wants_html`)."""

from __future__ import annotations

import pytest

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.mark.parametrize("path", ["/nope", "/plans", "/runs/abc/nope", "/static/nope.js"])
def test_unknown_html_paths_answer_the_404_page(client, path):
    r = client.get(path, headers=BROWSER)
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/html")
    assert 'id="not-found"' in r.text and f"<code>{path}</code>" in r.text
    assert client.head(path, headers=BROWSER).status_code == 404


def test_the_path_is_escaped(client):
    r = client.get("/<script>alert(1)</script>", headers=BROWSER)
    assert r.status_code == 404 and "<script>alert" not in r.text
    assert "&lt;script&gt;" in r.text


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/plans/nope", "/v1/verifications/x/profile"])
def test_api_paths_keep_json_errors_even_for_browsers(client, path):
    r = client.get(path, headers=BROWSER)
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert "message" in r.json()


@pytest.mark.parametrize("headers", [{}, {"Accept": "*/*"}, {"Accept": "application/json"}])
def test_api_clients_get_json_everywhere(client, headers):
    r = client.get("/nope", headers=headers)
    assert r.status_code == 404 and r.json() == {"detail": "Not Found", "message": "Not Found"}


def test_other_methods_and_codes_stay_json(client):
    r = client.post("/nope", headers=BROWSER)
    assert r.status_code in (404, 405) and r.headers["content-type"] == "application/json"
    r = client.get("/v1/plans", headers=BROWSER, params={"limit": -1})  # a 422 stays JSON
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
