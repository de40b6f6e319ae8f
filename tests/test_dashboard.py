"""The web dashboard at `/`, driven in a real browser (Debian's Chromium through Playwright) against a real
node on 127.0.0.1 serving the tiny random model through PersonalEngine. Screenshots of each main view go to
test-output/screenshots/ for a human to look at.

Needs /usr/bin/chromium (`apt-get install -y chromium`) and the `playwright` Python package; Playwright never
downloads a browser here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ownlm.api.app import create_app
from ownlm.basemodel import load_base
from ownlm.engine.personal import PersonalEngine
from ownlm.settings import load_settings
from ownlm.store import NewMessage, Store
from tests import test_personal_engine as personal  # module import: its tests are not collected again here
from tests.servers import ThreadServer

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-output" / "screenshots"
EXPORTS = REPO.parent / "shared" / "fixtures" / "exports"

if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium: install it with `apt-get install -y chromium` to run the browser tests",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
expect = sync_api.expect
expect.set_options(timeout=30_000)  # two shared CPU cores: generation and page loads can be slow


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def node(home, tiny_base):
    """A real node on 127.0.0.1: the tiny model behind PersonalEngine, users alice and bob with tokens."""
    settings = load_settings(base=str(tiny_base), device="cpu")
    store = Store(home)
    engine = PersonalEngine(load_base(settings), store)
    alice, bob = store.create_user("alice"), store.create_user("bob")
    with ThreadServer(create_app(settings, store, engine)) as server:
        server.settings, server.store, server.engine = settings, store, engine
        server.users = {"alice": alice, "bob": bob}
        server.tokens = {"alice": store.create_token(alice.id), "bob": store.create_token(bob.id)}
        yield server
    store.close()


@pytest.fixture
def open_page(browser, node):
    """open_page(who, width=1100) -> a signed-in page in its own browser context (own sessionStorage)."""
    contexts = []

    def _open(who: str, width: int = 1100):
        ctx = browser.new_context(viewport={"width": width, "height": 900})
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        page.goto(node.url + "/")
        page.get_by_label("Access token").fill(node.tokens[who])
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Chat")).to_be_visible()
        page.get_by_label("Longest answer").fill("24")  # short answers keep the tiny model fast
        return page

    yield _open
    for ctx in contexts:
        ctx.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def go(page, view: str, heading: str) -> None:
    page.get_by_role("link", name=view, exact=True).click()
    expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()


def test_login_refuses_a_bad_token_and_keeps_a_good_one_in_the_tab(browser, node):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(node.url + "/")
    csp = page.request.get(node.url + "/").headers["content-security-policy"]
    assert "default-src 'self'" in csp  # nothing may load from elsewhere
    shot(page, "login")
    page.get_by_label("Access token").fill("olm_not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That token is not valid on this node.")
    page.get_by_label("Access token").fill(node.tokens["alice"])
    page.keyboard.press("Enter")  # the form works from the keyboard
    expect(page.get_by_role("heading", name="Chat")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('ownlm.token')") == node.tokens["alice"]
    assert page.evaluate("localStorage.length") == 0
    page.reload()  # still signed in within the tab
    expect(page.get_by_role("link", name="Status")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Access token")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('ownlm.token')") is None
    ctx.close()


def test_chat_streams_and_compares_with_the_base(open_page, node):
    page = open_page("alice")
    frames = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(payload)))
    page.get_by_label("Message").fill("Hello, who are you?")
    page.keyboard.press("Enter")
    answer = page.locator(".answer").first
    expect(answer).to_have_attribute("aria-busy", "false")
    text = answer.locator(".answer-text").inner_text()
    assert text.strip()
    assert sum('"type":"token"' in f.replace(" ", "") for f in frames) > 1  # streamed piece by piece
    # side by side: the same question answered by the personal model and the base, one stored question
    page.get_by_label("Compare with the base model side by side").check()
    page.get_by_label("Message").fill("And a second question?")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".answers.two .answer")).to_have_count(2)
    expect(page.locator(".answers.two .answer[aria-busy=false] .actions:not([hidden])")).to_have_count(2)
    expect(page.get_by_role("article", name=re.compile("Base model"))).to_be_visible()
    shot(page, "chat-compare")
    alice = node.users["alice"]
    (conv,) = node.store.list_conversations(alice.id)
    msgs = node.store.get_messages(alice.id, conv["id"])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "assistant"]
    assert msgs[3]["parent_id"] == msgs[4]["parent_id"] == msgs[2]["id"]  # two sibling answers
    assert msgs[1]["content"] == text
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: the two answers stack
    shot(page, "chat-narrow")


def test_a_reply_shows_what_it_remembered_and_only_from_the_same_user(open_page, node):
    alice, bob = node.users["alice"], node.users["bob"]
    past = node.store.capture(alice.id, [NewMessage("user", "My dog is called Biscuit."),
                                         NewMessage("assistant", "A fine name.")], source="api", seed="past:a")
    node.store.capture(bob.id, [NewMessage("user", "My dog is called Rex."), NewMessage("assistant", "Good.")],
                       source="api", seed="past:b")
    page = open_page("alice")
    memory_box = page.get_by_label("Use memory")
    expect(memory_box).not_to_be_checked()  # the node's default: off
    page.get_by_label("Message").fill("What is my dog called?")
    page.keyboard.press("Enter")
    expect(page.locator(".answer").first).to_have_attribute("aria-busy", "false")
    expect(page.get_by_role("complementary", name="Remembered from")).to_have_count(0)  # hidden: nothing used
    memory_box.check()
    page.get_by_label("Message").fill("Do you remember my dog's name?")
    page.keyboard.press("Enter")
    answer = page.locator(".answer").nth(1)
    expect(answer).to_have_attribute("aria-busy", "false")
    remembered = answer.get_by_role("complementary", name="Remembered from")
    expect(remembered).to_contain_text("Remembered from")
    expect(remembered.locator("li")).to_have_text(["My dog is called Biscuit."])
    assert remembered.locator("li").get_attribute("data-conversation-id") == past.conversation_id
    expect(answer).not_to_contain_text("Rex")
    shot(page, "chat-memory")
    # the user's own setting is what the box starts as next time
    node.store.set_memory(alice.id, True)
    other = open_page("alice")
    expect(other.get_by_label("Use memory")).to_be_checked()


def test_thumbs_down_and_an_edit_are_stored(open_page, node):
    page = open_page("alice")
    page.get_by_label("Message").fill("Write me a haiku.")
    page.get_by_role("button", name="Send").click()
    page.get_by_role("button", name="Bad answer").click()
    expect(page.get_by_text("Noted: this answer will not be learned from.")).to_be_visible()
    expect(page.get_by_role("button", name="Bad answer")).to_have_attribute("aria-pressed", "true")
    page.get_by_role("button", name="Edit the answer").click()
    editor = page.get_by_label("Your better answer")
    expect(editor).to_be_focused()
    editor.fill("Old pond, a frog jumps.")
    page.get_by_role("button", name="Save edit").click()
    expect(page.get_by_text("Saved: your edit is what the model will learn.")).to_be_visible()
    expect(page.locator(".answer-text.edited")).to_have_text("Old pond, a frog jumps.")
    shot(page, "chat-feedback")
    answer_id = page.locator(".answer").first.get_attribute("data-message-id")
    rows = node.store.query("SELECT message_id, thumbs, edited_content FROM feedback WHERE user_id = ? ORDER BY id",
                            (node.users["alice"].id,))
    assert rows == [(answer_id, -1, None), (answer_id, None, "Old pond, a frog jumps.")]


def test_privacy_tier_lowering_asks_for_confirmation(open_page, node):
    page = open_page("alice")
    go(page, "Privacy", "Privacy")
    expect(page.get_by_label(re.compile("^1 — This machine only"))).to_be_checked()
    page.get_by_label(re.compile("^2 — Trusted hardware")).check()  # raising: no question asked
    page.get_by_role("button", name="Save privacy tier").click()
    expect(page.locator("#flash")).to_have_text(re.compile("Privacy tier is now 2"))
    assert node.store.get_user("alice").privacy_tier == 2
    page.get_by_label(re.compile("^0 — Cloud")).check()
    page.get_by_role("button", name="Save privacy tier").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Lower your privacy tier?")
    shot(page, "privacy-confirm")
    dialog.get_by_role("button", name="Cancel").click()
    expect(page.locator("#flash")).to_have_text("Privacy tier unchanged.")
    assert node.store.get_user("alice").privacy_tier == 2
    page.get_by_label(re.compile("^0 — Cloud")).check()
    page.get_by_role("button", name="Save privacy tier").click()
    page.get_by_role("dialog").get_by_role("button", name="Lower the tier").click()
    expect(page.locator("#flash")).to_have_text(re.compile("Privacy tier is now 0"))
    assert node.store.get_user("alice").privacy_tier == 0
    expect(page.get_by_label(re.compile("^0 — Cloud"))).to_be_checked()
    shot(page, "privacy")


def test_import_an_export_shows_the_summary(open_page, node):
    page = open_page("alice")
    go(page, "Data", "Your data")
    export = EXPORTS / "sharegpt" / "axolotl-conversation.json"
    page.get_by_label(re.compile("^Export file")).set_input_files(str(export))
    page.get_by_role("button", name="Import", exact=True).click()
    summary = page.locator("#import-summary")
    expect(summary).to_contain_text("Imported axolotl-conversation.json")
    expect(summary).to_contain_text("sharegpt")
    stats = node.store.stats(node.users["alice"].id)
    assert stats["messages"] > 0
    expect(summary).to_contain_text(f"{stats['conversations']} new, 0 already stored")
    expect(page.locator("#data-totals")).to_contain_text(f"{stats['messages']} messages")
    shot(page, "data-import")
    # the same file again: everything is already stored
    page.get_by_label(re.compile("^Export file")).set_input_files(str(export))
    page.get_by_role("button", name="Import", exact=True).click()
    expect(summary).to_contain_text(f"0 new, {stats['conversations']} already stored")
    assert node.store.stats(node.users["alice"].id) == stats
    # a file that is no export: the importer's message names the uploaded file, not a temp path
    page.get_by_label(re.compile("^Export file")).set_input_files(
        files=[{"name": "notes.json", "mimeType": "application/json", "buffer": b'{"hello": 1}'}])
    page.get_by_role("button", name="Import", exact=True).click()
    expect(summary).to_contain_text("Not imported: notes.json is JSON, but not an export format ownlm knows")


def test_delete_with_confirmation_empties_the_store(open_page, node):
    alice = node.users["alice"]
    for title in ("first chat", "second chat"):
        node.store.capture(alice.id, [NewMessage("user", f"{title}?"), NewMessage("assistant", "yes")],
                           source="test", seed=title, title=title)
    page = open_page("alice")
    go(page, "Data", "Your data")
    page.get_by_role("button", name="Delete conversation first chat").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("1 conversations, 2 messages and 0 feedback entries")
    dialog.get_by_role("button", name="Delete").click()
    expect(page.locator("#conversations")).not_to_contain_text("first chat")
    assert node.store.stats(alice.id)["conversations"] == 1
    page.get_by_role("button", name="Delete all my conversations…").click()
    expect(dialog).to_contain_text("1 conversations, 2 messages")
    shot(page, "data-delete-confirm")
    dialog.get_by_role("button", name="Delete").click()
    expect(page.locator("#conversations")).to_contain_text("No conversations stored.")
    assert node.store.stats(alice.id) == {"conversations": 0, "messages": 0, "feedback": 0}
    shot(page, "data")


def test_models_view_shows_versions_and_rolls_back(open_page, node, tiny_delta):
    alice = node.users["alice"]
    for version in (1, 2):
        personal.deploy(node.store, node.settings, alice, tiny_delta, version)
    node.engine.refresh()
    page = open_page("alice")
    go(page, "Models", "Your models")
    expect(page.locator("#models-active")).to_have_text("Answering with version 2.")
    v1, v2 = page.locator("tr[data-version='1']"), page.locator("tr[data-version='2']")
    expect(v2).to_contain_text("● active")
    for row in (v1, v2):
        expect(row).to_contain_text("✔ verified")
        expect(row).to_contain_text("3.200 → 2.900")  # held-out loss from the training report
        expect(row).to_contain_text(re.compile(r"\d+\.\d KB"))
    shot(page, "models")
    page.get_by_role("button", name="Roll back to v1").click()
    expect(page.locator("#models-active")).to_have_text("Answering with version 1.")
    expect(v1).to_contain_text("● active")
    assert node.store.active_model(alice.id)["version"] == 1
    page.get_by_role("button", name="Use the base model (no personal model)").click()
    expect(page.locator("#models-active")).to_contain_text("base model")
    assert node.store.active_model(alice.id) is None
    go(page, "Learning", "How your model learns")
    expect(page.locator("#plot-versions svg circle")).to_have_count(4)  # 2 versions × (base, personal)
    shot(page, "learning")


def test_status_shows_samples_and_train_now(open_page, node):
    alice = node.users["alice"]
    node.store.capture(alice.id, [NewMessage("user", "hi"), NewMessage("assistant", "hello")], source="test", seed="s")
    page = open_page("alice")
    go(page, "Status", "Learning status")
    min_samples = node.settings.personalization.min_samples
    expect(page.locator("#st-samples")).to_have_text(re.compile(rf"of {min_samples} samples since the last model"))
    expect(page.locator("#st-job")).to_have_text("No round running.")
    page.get_by_role("button", name="Train now").click()
    expect(page.locator("#flash")).to_contain_text("queued")
    expect(page.locator("#st-job")).to_contain_text("queued")
    shot(page, "status")
    page.get_by_role("button", name="Train now").click()  # one open round per user: the node says so
    expect(page.locator("#flash")).to_have_class(re.compile("error"))


def test_another_users_dashboard_shows_nothing_of_alice(open_page, node, tiny_delta):
    alice = node.users["alice"]
    node.store.capture(alice.id, [NewMessage("user", "alice's secret plan"), NewMessage("assistant", "ok")],
                       source="test", seed="secret", title="alice secret")
    personal.deploy(node.store, node.settings, alice, tiny_delta, 1)
    node.engine.refresh()
    page = open_page("bob")
    for view, heading in (("Data", "Your data"), ("Models", "Your models"), ("Learning", "How your model learns"),
                          ("Status", "Learning status")):
        go(page, view, heading)
        page.wait_for_load_state("networkidle")
        assert "secret" not in page.content()
    go(page, "Data", "Your data")
    expect(page.locator("#conversations")).to_contain_text("No conversations stored.")
    go(page, "Models", "Your models")
    expect(page.locator("#models-table tbody")).to_contain_text("No personal model yet")
    shot(page, "models-other-user")
    # alice, in another context, sees her own
    page_a = open_page("alice")
    go(page_a, "Data", "Your data")
    expect(page_a.locator("#conversations")).to_contain_text("alice secret")


# ---- a new user's first visit, on a phone -------------------------------------------------------------

PHONE = 390  # px wide (viewport 390x900): an ordinary phone


def no_horizontal_overflow(page) -> None:
    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the document is {width[0]} px wide on a {width[1]} px screen"


def test_sign_in_names_the_real_command_and_a_good_login_clears_the_stale_banner(browser, node):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.set_default_timeout(30_000)  # as open_page: a full `make test` leaves the browser little CPU (actions;
    # expect() has its own 5 s, given below where the failure was seen)
    page.goto(node.url + "/")
    expect(page.locator("#view-login")).to_contain_text("ownlm token create")
    assert "ownlm user token" not in page.locator("#view-login").inner_text()
    page.get_by_label("Access token").fill(node.tokens["alice"])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Chat")).to_be_visible()
    node.store.revoke_tokens(node.users["alice"].id)  # e.g. revoked from the command line
    go_link = page.get_by_role("link", name="Status", exact=True)
    go_link.click()
    expect(page.get_by_label("Access token")).to_be_visible(timeout=30_000)  # a 401 sends the user back to sign in
    expect(page.locator("#flash")).to_contain_text("no longer valid")
    page.get_by_label("Access token").fill(node.store.create_token(node.users["alice"].id))
    page.get_by_role("button", name="Sign in").click()
    # signed in again, on whichever view the hash names: the chat view's own requests may meet the revoked token
    # before or after the Status click, so the view the user lands on is not fixed (and not what this tests)
    expect(page.get_by_label("Access token")).to_be_hidden(timeout=30_000)
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    expect(page.locator("#flash")).to_be_hidden()  # the old banner must not stay over a good session
    ctx.close()


def test_a_revoked_token_on_the_chat_socket_returns_to_sign_in(open_page, node):
    page = open_page("alice")
    closes, requests = [], []
    page.on("websocket", lambda ws: ws.on("close", lambda w: closes.append(w.url)))
    node.store.revoke_tokens(node.users["alice"].id)
    page.on("request", lambda r: requests.append(r.url))
    page.get_by_label("Message").fill("are you there?")
    page.keyboard.press("Enter")
    expect(page.get_by_label("Access token")).to_be_visible()
    expect(page.locator("#flash")).to_contain_text("no longer valid")
    # the page learnt it from the socket's 4401 close, not by asking over HTTP after a bare 1006
    assert closes and not [u for u in requests if "/v1/" in u or "/api/" in u]


def test_data_view_pages_titles_and_opens_conversations_on_a_phone(open_page, node):
    alice = node.users["alice"]
    with node.store.tx() as db:  # 320 untitled chats, like an imported history
        for i in range(320):
            node.store.capture(alice.id, [NewMessage("user", f"Question number {i}: how do I   make\nbread?"),
                                          NewMessage("assistant", f"Answer {i}: flour, water, salt.")],
                               source="test", seed=f"chat-{i}", created_at=1_700_000_000 + i, db=db)
    page = open_page("alice", width=PHONE)
    go(page, "Data", "Your data")
    rows = page.locator("#conversations li")
    expect(rows).to_have_count(20)
    expect(page.locator("#conv-pager")).to_contain_text("1–20 of 320")
    expect(rows.first).to_contain_text("Question number")  # the first user message names an untitled chat
    assert "(untitled)" not in page.locator("#conversations").inner_text()
    height = page.evaluate("document.documentElement.scrollHeight")
    assert height < 6000, f"the data view is {height} px tall"
    no_horizontal_overflow(page)
    shot(page, "data-phone")
    page.get_by_role("button", name="Older").click()
    expect(page.locator("#conv-pager")).to_contain_text("21–40 of 320")
    first = rows.first.locator("button.conv-open")
    title = first.inner_text()
    n = int(re.search(r"Question number (\d+)", title).group(1))
    first.click()
    messages = rows.first.locator(".conv-messages")
    expect(messages).to_contain_text(f"Answer {n}: flour, water, salt.")
    expect(messages).to_contain_text(f"Question number {n}")
    expect(first).to_have_attribute("aria-expanded", "true")
    no_horizontal_overflow(page)
    shot(page, "data-phone-open")
    first.click()  # closes again
    expect(messages).to_be_hidden()


def test_models_and_chat_fit_a_phone(open_page, node, tiny_delta):
    alice = node.users["alice"]
    for version in (1, 2):
        personal.deploy(node.store, node.settings, alice, tiny_delta, version)
    node.engine.refresh()
    page = open_page("alice", width=PHONE)
    no_horizontal_overflow(page)
    go(page, "Models", "Your models")
    expect(page.locator("tr[data-version='2']")).to_contain_text("● active")
    no_horizontal_overflow(page)
    wrap = page.locator(".table-wrap")
    box = wrap.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE  # the table scrolls inside its card
    shot(page, "models-phone")
