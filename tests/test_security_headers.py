"""Security headers on every response, self-hosted API docs, and the spec's auth and error responses, against a
real node on 127.0.0.1; framing and the docs page are checked in a real browser (Debian's Chromium)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from ownlm.api.app import DASHBOARD_CSP, create_app
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.servers import ThreadServer

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = ["/", "/static/index.html", "/docs"]  # every HTML page the node serves


@pytest.fixture
def node(home):
    """A capture-only node (no model: nothing here generates) with a user and a token, and one route that
    crashes (a stand-in for a bug: the 500 it gives must carry the headers too)."""
    settings = load_settings(max_body_bytes=4096)
    store = Store(home)
    user = store.create_user("alice")
    app = create_app(settings, store, None)

    def crash():
        raise RuntimeError("a bug")

    app.add_api_route("/test-crash", crash, include_in_schema=False)
    with ThreadServer(app) as server:
        server.token = store.create_token(user.id)
        server.auth = {"Authorization": f"Bearer {server.token}"}
        yield server
    store.close()


def responses(node) -> dict[str, httpx.Response]:
    """One response of each kind the node gives: pages, static files, JSON, and each error path."""
    with httpx.Client(base_url=node.url, timeout=30) as c:
        interactions = "/api/personalization/interactions"
        return {
            **{page: c.get(page) for page in PAGES},
            "static js": c.get("/static/app.js"),
            "health": c.get("/health"),
            "spec": c.get("/openapi.json"),
            "404 route": c.get("/no-such-route"),
            "404 static": c.get("/static/no-such-file.js"),
            "401": c.get("/api/personalization/conversations"),
            "200 api": c.get("/api/personalization/conversations", headers=node.auth),
            "413": c.post(interactions, headers=node.auth, content=b"x" * 5000),
            "422": c.post(interactions, headers=node.auth, json={"messages": []}),
            "503": c.get("/v1/models", headers=node.auth),
            "405": c.put("/health"),
            "500": c.get("/test-crash"),
        }


def test_every_response_carries_the_security_headers(node):
    got = responses(node)
    assert {k: r.status_code for k, r in got.items()} == {
        "/": 200, "/static/index.html": 200, "/docs": 200, "static js": 200, "health": 200, "spec": 200,
        "404 route": 404, "404 static": 404, "401": 401, "200 api": 200, "413": 413, "422": 422, "503": 503,
        "405": 405, "500": 500}
    for what, r in got.items():
        h = r.headers
        assert h.get("x-content-type-options") == "nosniff", what
        assert h.get("x-frame-options") == "DENY", what
        assert h.get("referrer-policy") == "no-referrer", what
        assert "frame-ancestors 'none'" in h.get("content-security-policy", ""), what
        if h["content-type"].startswith("text/html"):
            assert h["content-security-policy"] == DASHBOARD_CSP, what  # pages load only from this node
        elif what not in ("static js", "404 static"):
            assert h["content-security-policy"].startswith("default-src 'none'"), what  # data renders nothing
    # the user's data is never kept in a cache; the pages and their files are revalidated on each load
    for what in ("health", "spec", "401", "200 api", "413", "422", "503", "404 route", "405", "500"):
        assert got[what].headers["cache-control"] == "no-store", what
    for what in ("/", "/static/index.html", "static js"):
        assert got[what].headers["cache-control"] == "no-cache", what


def test_the_docs_are_self_hosted_and_redoc_is_off(node):
    page = httpx.get(node.url + "/docs").text
    assert "cdn" not in page.lower() and "http" not in page  # every URL is relative to this node
    assert httpx.get(node.url + "/redoc").status_code == 404
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/docs/init.js"):
        r = httpx.get(node.url + asset)
        assert r.status_code == 200 and len(r.content) > 300, asset


def test_the_spec_declares_bearer_auth_and_the_real_error_responses(node):
    spec = httpx.get(node.url + "/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert [s for s in schemes.values() if (s["type"], s["scheme"]) == ("http", "bearer")], schemes
    error = spec["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            if path == "/health":
                assert "security" not in op, where
                continue
            assert op.get("security"), where  # every other route needs the token...
            assert "401" in op["responses"], where  # ...and says what happens without it
            for code, resp in op["responses"].items():
                if code.startswith("4") or code.startswith("5"):
                    ref = resp["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse"), (where, code)
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"401", "404", "413", "422", "429", "503"} <= set(chat)
    assert "text/event-stream" in chat["200"]["content"]  # stream=true answers with server-sent events
    deploy = spec["paths"]["/api/personalization/deploy"]["post"]
    assert {"401", "403", "404", "409", "413", "422"} <= set(deploy["responses"])
    assert "application/octet-stream" in deploy["requestBody"]["content"]
    assert "409" in spec["paths"]["/api/personalization/train"]["post"]["responses"]
    # the declared error body is the one sent
    r = httpx.get(node.url + "/api/personalization/conversations")
    assert r.status_code == 401 and set(r.json()["error"]) == {"type", "message", "hint"}


def test_the_trainer_serves_the_same_headers_and_self_hosted_docs():
    from ownlm.api.trainer_app import create_trainer_app

    # the routes checked here never touch the trainer itself
    with ThreadServer(create_trainer_app(trainer=None)) as server:
        docs, missing = httpx.get(server.url + "/docs"), httpx.get(server.url + "/no-such-route")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    for r in (docs, missing):
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


# ---------------------------------------------------------------------------------------- in Chromium

@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: install it with `apt-get install -y chromium` to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.mark.parametrize("path", PAGES)
def test_no_page_of_the_node_can_be_framed_by_another_site(browser, node, path, tmp_path):
    # another origin (a file:// page) embeds the node's page: a clickjacking attempt
    attacker = tmp_path / "attacker.html"
    attacker.write_text(f'<!doctype html><title>evil</title><iframe id="f" src="{node.url}{path}"></iframe>')
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        page.goto(attacker.as_uri())
        child = next(f for f in page.frames if f is not page.main_frame)
        for _ in range(150):  # until the frame's navigation is committed (15 s at most)
            if child.url not in ("", "about:blank"):
                break
            page.wait_for_timeout(100)
        # a refused frame is Chromium's error page, not the node's document
        assert child.url.startswith("chrome-error://"), child.url
    finally:
        ctx.close()


def test_the_docs_page_renders_in_a_browser_from_this_node_only(browser, node):
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        requests, problems = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(node.url + "/docs")
        page.get_by_text("/v1/chat/completions").first.wait_for(timeout=30_000)
        assert page.get_by_role("button", name="Authorize").first.is_visible()  # the bearer scheme
        assert problems == []  # no CSP violation, no script error
        assert requests and all(u.startswith(node.url + "/") for u in requests), requests
    finally:
        ctx.close()
