"""Importers against every real export fixture, bad inputs, detection, and both llm logs.db schemas.

Expected counts were determined by reading each fixture by hand; the comment on each row says why.
"""

from __future__ import annotations

import json
import os
import sqlite3
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from ownlm.capture.importers import FORMATS, detect_format, parse_file
from ownlm.capture.importers._common import to_timestamp
from ownlm.capture.importers.base import ImportResult
from ownlm.errors import ImportFormatError, InvalidInput, OwnlmError

EXPORTS = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "exports"

# (path under exports/, format, conversations, messages, skipped, bad)
CASES = [
    # 1 conversation; the single visible branch: 8 user + 12 assistant text nodes. 2 hidden system nodes,
    # 11 `code` calls to python and 11 python `tool` outputs are skipped.
    ("chatgpt/chatgpt2graph-code-interpreter.json", "chatgpt", 1, 20, {"system": 2, "code": 11, "tool": 11}, 0),
    # Mapping has no root (both parents dangle): the tether_browsing_display tool node is skipped, the
    # assistant answer is kept.
    ("chatgpt/librechat-chatgpt-citations.json", "chatgpt", 1, 1, {"tool": 1}, 0),
    # Conv 1: 3 questions, 3 answers, 4 browser `code` calls, 5 browser tool results; conv 2: 2 + 2.
    ("chatgpt/librechat-chatgpt-export.json", "chatgpt", 2, 10, {"system": 2, "code": 4, "tool": 5}, 0),
    # 3 entries: "Corrupted entry" has no mapping (bad); 4 + 2 text messages; one user_editable_context.
    ("chatgpt/librechat-chatgpt-modern-export.json", "chatgpt", 2, 6, {"user_editable_context": 1}, 1),
    # current_node's branch: hi there / Hello / hi again / Hey / tell me a joke / joke = 6; the other
    # 5 message nodes (so cool bro, Thanks, tell me a story, story, first joke) are inactive.
    ("chatgpt/librechat-chatgpt-tree.json", "chatgpt", 1, 6, {"inactive_branch": 5, "system": 1}, 0),
    # 5 user/assistant pairs; a hidden system node and the user_editable_context node are skipped.
    (
        "chatgpt/openwebui-importer-gpt4o-user-context.json",
        "chatgpt",
        1,
        10,
        {"system": 1, "user_editable_context": 1},
        0,
    ),
    # Single object. Visible: the user's multimodal question (2 image parts dropped) and the final answer;
    # thoughts, the browser.search call and its result, the recap and the context node are skipped and
    # "Superseded answer." is on the inactive branch.
    (
        "chatgpt/polylogue-modern-synthetic-branch.json",
        "chatgpt",
        1,
        2,
        {"inactive_branch": 1, "system": 1, "image": 2, "thoughts": 1, "tool_call": 1, "tool": 1, "reasoning_recap": 1},
        0,
    ),
    # Web-API shape: the chain to current_leaf_message_uuid is 4 messages; each assistant text holds one
    # inline <antThinking> block, removed.
    ("claude/claude-chat-viewer-api-conversation.json", "claude", 1, 4, {"thinking": 2}, 0),
    # conv-1 (1 msg) and conv-5 (1 good msg, 1 with content: null) import; conv-2 (no chat_messages),
    # conv-3 (empty) and conv-4 (content is a string) are bad.
    ("claude/claude-chat-viewer-malformed.json", "claude", 2, 2, {"malformed_content": 2}, 3),
    # Old shape (text only): 10 human + 10 assistant; 10 <antThinking> blocks stripped.
    ("claude/claude-to-sqlite-artifacts.json", "claude", 1, 20, {"thinking": 10}, 0),
    # Old shape: one question, one answer.
    ("claude/claude-to-sqlite-example.json", "claude", 1, 2, {}, 0),
    # Messages have no sender at all: nothing can be attributed, so the conversation is bad.
    ("claude/openwebui-importer-private-use-unicode.json", "claude", 0, 0, {"no_sender": 2}, 1),
    # text: "" with content[]: 1 question, 1 answer; the thinking block is skipped.
    ("claude/openwebui-importer-thinking-empty-text.json", "claude", 1, 2, {"thinking": 1}, 0),
    # Single object, 12 turns human/gpt.
    ("sharegpt/axolotl-conversation.json", "sharegpt", 1, 12, {}, 0),
    # Same, with turn 2 (gpt) empty.
    ("sharegpt/axolotl-conversation-missingturns.json", "sharegpt", 1, 11, {"empty": 1}, 0),
    # 500 records, 1000 human + 1000 gpt turns.
    ("sharegpt/fastchat-dummy-conversation.json", "sharegpt", 500, 2000, {}, 0),
    # 6 records of messages[role/content], 12 user + 12 assistant.
    ("sharegpt/llamafactory-mllm-demo-role-content.json", "sharegpt", 6, 24, {}, 0),
    # 5 lines: 3 + 9 + 2 + 2 + 3 messages.
    ("openai-finetune/cookbook-toy-chat-fine-tuning.jsonl", "openai_jsonl", 5, 19, {}, 0),
    # 10 lines of system/user/assistant, no final newline.
    ("openai-finetune/genai-beginners-training-data-no-final-newline.jsonl", "openai_jsonl", 10, 30, {}, 0),
    # One chat, currentId's branch: 1 question, 1 answer.
    ("open-webui/openwebui-importer-single-chat.json", "open_webui", 1, 2, {}, 0),
    # 3 chats of 2 messages; one <details type="reasoning"> and one <details type="tool_calls"> removed.
    ("open-webui/librechat-openwebui-export.json", "open_webui", 3, 6, {"reasoning": 1, "tool_calls": 1}, 0),
    # Linear nested chain of 6.
    ("librechat/librechat-export.json", "librechat", 1, 6, {}, 0),
    # 9 messages, 2 branch points; the deepest leaf's branch has 6, the other 3 are inactive.
    ("librechat/librechat-tree.json", "librechat", 1, 6, {"inactive_branch": 3}, 0),
    # 2 conversations: system prompt + 4 and system prompt + 2 messages.
    ("chatbot-ui/librechat-chatbotui-export.json", "chatbot_ui", 2, 8, {}, 0),
    # 10 responses, human/ASSISTANT alternating, a linear chain.
    ("grok/openwebui-importer-grok-export.json", "grok", 1, 10, {}, 0),
    # user chunk, an isThought model chunk (skipped), the answer.
    ("gemini-aistudio/openwebui-importer-aistudio-thoughts.json", "aistudio", 1, 2, {"thoughts": 1}, 0),
]


def load(rel: str) -> ImportResult:
    return parse_file(EXPORTS / rel)


def texts(result: ImportResult) -> str:
    return "\n".join(m.content for c in result.conversations for m in c.messages)


def roles(conversation) -> list[str]:
    return [m.role for m in conversation.messages]


def alternates(conversation) -> bool:
    chat = [r for r in roles(conversation) if r != "system"]
    return chat[0] == "user" and all(a != b for a, b in zip(chat, chat[1:]))


def test_every_fixture_has_a_case():
    files = {str(p.relative_to(EXPORTS)) for p in EXPORTS.rglob("*") if p.is_file() and p.name != "SOURCES.md"}
    assert files == {case[0] for case in CASES}


@pytest.mark.parametrize("rel,fmt,n_conv,n_msg,skipped,n_bad", CASES, ids=[c[0] for c in CASES])
def test_fixture_counts(rel, fmt, n_conv, n_msg, skipped, n_bad):
    assert detect_format(EXPORTS / rel) == fmt
    result = load(rel)
    assert result.format == fmt
    assert len(result.conversations) == n_conv
    assert result.message_count == n_msg
    assert result.skipped == Counter(skipped)
    assert len(result.bad) == n_bad
    for conversation in result.conversations:
        assert conversation.source == fmt
        assert all(m.role in ("system", "user", "assistant") for m in conversation.messages)
        assert all(m.content and m.content == m.content.strip() for m in conversation.messages)
        assert all(m.model is None for m in conversation.messages if m.role != "assistant")
        times = [m.created_at for m in conversation.messages]
        assert all(t is None or isinstance(t, float) for t in times)


# --- ChatGPT ---------------------------------------------------------------------------------------------


def test_chatgpt_code_interpreter():
    (conv,) = load("chatgpt/chatgpt2graph-code-interpreter.json").conversations
    assert conv.title == "Average Distance in U(0,1)"
    assert conv.messages[0].role == "user"
    assert conv.messages[0].content.startswith("given two random independent variables x,y in U(0,1)")
    assert {m.model for m in conv.messages if m.role == "assistant"} == {"gpt-4-code-interpreter"}
    assert "<<ImageDisplayed>>" not in texts(load("chatgpt/chatgpt2graph-code-interpreter.json"))
    assert conv.messages[0].created_at == pytest.approx(1695326273.969279)
    assert conv.messages[-1].content.startswith("Here's the updated graph with the mean split frequency")


def test_chatgpt_branch_follows_current_node():
    (conv,) = load("chatgpt/librechat-chatgpt-tree.json").conversations
    assert [m.content for m in conv.messages][:5] == [
        "hi there",
        "Hello! How can I assist you today?",
        "hi again",
        "Hey! Welcome back. What's on your mind?",
        "tell me a joke",
    ]
    assert alternates(conv)
    body = texts(load("chatgpt/librechat-chatgpt-tree.json"))
    assert "so cool bro" not in body and "tell me a story" not in body


def test_chatgpt_missing_current_node_takes_latest_leaf(tmp_path):
    data = json.loads((EXPORTS / "chatgpt/librechat-chatgpt-tree.json").read_text())
    del data[0]["current_node"]
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps(data))
    (conv,) = parse_file(path).conversations
    # The latest leaf (create_time 1714585060.6) is the same node current_node named.
    assert [m.content for m in conv.messages][2] == "hi again"
    assert conv.messages[-1].created_at == pytest.approx(1714585060.598792)


def test_chatgpt_single_object_multimodal_and_reasoning():
    result = load("chatgpt/polylogue-modern-synthetic-branch.json")
    (conv,) = result.conversations
    assert roles(conv) == ["user", "assistant"]
    assert conv.messages[0].content == "Analyze the attached fixture and create an artifact."
    assert conv.messages[1].content.startswith("Final answer.")
    assert conv.messages[1].model == "gpt-5-6-pro"
    body = texts(result)
    for hidden in ("Superseded answer.", "Privacy-safe reasoning trace.", "Privacy-safe tool result.", "evidence"):
        assert hidden not in body


def test_chatgpt_no_root_and_dangling_parents():
    (conv,) = load("chatgpt/librechat-chatgpt-citations.json").conversations
    assert roles(conv) == ["assistant"]
    assert conv.messages[0].content.startswith("Signal Sciences is a web application security company")
    assert conv.messages[0].model == "gpt-4"


def test_chatgpt_modern_export_without_mapping_is_bad():
    result = load("chatgpt/librechat-chatgpt-modern-export.json")
    (bad,) = result.bad
    assert bad.index == 1 and "mapping" in bad.reason
    assert [c.title for c in result.conversations] == ["Deploying the staging cluster", "Weeknight pasta"]
    assert "The user is an SRE." not in texts(result)
    assert result.conversations[0].messages[-1].model == "o4-mini"


def test_chatgpt_user_context_and_models():
    result = load("chatgpt/openwebui-importer-gpt4o-user-context.json")
    (conv,) = result.conversations
    assert conv.messages[0].content == "Can you explain how photosynthesis works in simple terms?"
    assert alternates(conv)
    assert {m.model for m in conv.messages if m.role == "assistant"} == {"gpt-4o"}
    assert "The user provided" not in texts(result)
    export = load("chatgpt/librechat-chatgpt-export.json")
    assert [{m.model for m in c.messages if m.role == "assistant"} for c in export.conversations] == [
        {"gpt-4"},
        {"text-davinci-002-render-sha"},
    ]
    assert all(alternates(c) for c in export.conversations)


# --- Claude ------------------------------------------------------------------------------------------------


def test_claude_api_shape_follows_leaf():
    (conv,) = load("claude/claude-chat-viewer-api-conversation.json").conversations
    assert conv.external_id == "8006a434-8b0b-43df-8e6d-c0a7aeb2e6b3"
    assert alternates(conv)
    assert conv.messages[0].content.startswith("Make an interactive visualization")
    assert conv.messages[2].content == "What are your ideas for extending this?"
    assert {m.model for m in conv.messages if m.role == "assistant"} == {"claude-3-5-sonnet-20240620"}
    assert "antThinking" not in texts(load("claude/claude-chat-viewer-api-conversation.json"))


def test_claude_api_shape_with_branches(tmp_path):
    data = json.loads((EXPORTS / "claude/claude-chat-viewer-api-conversation.json").read_text())
    first_answer = data["chat_messages"][1]
    retry = {**first_answer, "uuid": "retry-1", "content": [{"type": "text", "text": "An abandoned retry."}]}
    data["chat_messages"].append(retry)
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(data))
    result = parse_file(path)
    assert result.message_count == 4
    assert result.skipped["inactive_branch"] == 1
    assert "An abandoned retry." not in texts(result)


def test_claude_malformed_keeps_good_conversations():
    result = load("claude/claude-chat-viewer-malformed.json")
    assert [c.external_id for c in result.conversations] == ["conv-1", "conv-5"]
    assert [(b.index, b.external_id) for b in result.bad] == [(1, "conv-2"), (2, "conv-3"), (3, "conv-4")]
    assert "chat_messages" in result.bad[0].reason and "empty" in result.bad[1].reason
    assert result.conversations[1].messages[0].content == "This is valid"
    assert "Invalid message" not in texts(result)


def test_claude_old_shape_sorted_by_time_and_thinking_removed():
    (conv,) = load("claude/claude-to-sqlite-artifacts.json").conversations
    # The export lists one human message first although it was written 9 minutes later; sorting fixes it.
    assert conv.messages[0].content.startswith("Built me an artifact with no react")
    assert alternates(conv)
    assert [m.created_at for m in conv.messages] == sorted(m.created_at for m in conv.messages)
    body = "\n".join(m.content for m in conv.messages)
    assert "<antThinking>" not in body and "<antArtifact" in body


def test_claude_example_and_thinking_blocks():
    (conv,) = load("claude/claude-to-sqlite-example.json").conversations
    assert roles(conv) == ["user", "assistant"]
    assert conv.messages[0].content == "Turn this into a bash command"
    assert conv.messages[1].content.startswith("To turn this into a bash command")
    assert conv.messages[0].created_at == pytest.approx(1729229420.458713)
    (conv,) = load("claude/openwebui-importer-thinking-empty-text.json").conversations
    assert [m.content for m in conv.messages] == ["Can you greet me?", "Hello there! It's great to hear from you."]


def test_claude_without_senders_is_bad():
    result = load("claude/openwebui-importer-private-use-unicode.json")
    assert result.bad[0].external_id == "conv1"


# --- ShareGPT, JSONL ------------------------------------------------------------------------------------------


def test_sharegpt_shapes():
    (conv,) = load("sharegpt/axolotl-conversation.json").conversations
    assert alternates(conv)
    assert conv.messages[0].content.startswith("how could i implement a minesweeper algorithm")
    (gap,) = load("sharegpt/axolotl-conversation-missingturns.json").conversations
    assert roles(gap)[:3] == ["user", "user", "assistant"]  # the empty gpt turn is gone
    dummy = load("sharegpt/fastchat-dummy-conversation.json")
    assert dummy.conversations[0].external_id == "identity_0"
    assert dummy.conversations[0].messages[0].content == "Who are you?"
    assert all(alternates(c) for c in dummy.conversations)
    factory = load("sharegpt/llamafactory-mllm-demo-role-content.json")
    assert factory.conversations[0].messages[0].content == "<image>Who are they?"
    assert all(alternates(c) for c in factory.conversations)


def test_sharegpt_roles(tmp_path):
    path = tmp_path / "sg.json"
    turns = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "hi"},
        {"from": "bard", "value": "hello"},
        {"from": "user", "value": "and?"},
        {"from": "chatgpt", "value": "more"},
        {"from": "observation", "value": "{}"},
        {"from": "bing", "value": "   "},
    ]
    path.write_text(json.dumps([{"id": "x", "conversations": turns}]))
    result = parse_file(path)
    assert roles(result.conversations[0]) == ["system", "user", "assistant", "user", "assistant"]
    assert result.skipped == Counter({"unknown_role": 1, "empty": 1})


def test_openai_jsonl_fixtures():
    result = load("openai-finetune/cookbook-toy-chat-fine-tuning.jsonl")
    assert result.conversations[0].messages[1].content == "I fell off my bike today."
    assert roles(result.conversations[2])[0] == "user"  # the line without a system message
    assert max(len(m.content) for m in result.conversations[4].messages) == 26000
    genai = load("openai-finetune/genai-beginners-training-data-no-final-newline.jsonl")
    assert genai.conversations[0].messages[1].content == "Tell me about Gallium"
    assert all(roles(c) == ["system", "user", "assistant"] for c in genai.conversations)


def test_openai_jsonl_bad_line_and_parts(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        '{"messages": [{"role": "user", "content": "broken',
        "",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url"}]},
                                 {"role": "assistant", "content": None, "tool_calls": [{}]},
                                 {"role": "tool", "content": "42"},
                                 {"role": "assistant", "content": "done"}]}),
        json.dumps({"prompt": "old completion format"}),
    ]
    path.write_text("\n".join(lines))
    result = parse_file(path)
    assert [c.messages[0].content for c in result.conversations] == ["a", "x"]
    assert [(b.index, b.reason.split(":")[0]) for b in result.bad] == [(2, "line 2"), (5, "line 5")]
    assert result.skipped == Counter({"image_url": 1, "tool_call": 1, "tool": 1})


# --- Other formats --------------------------------------------------------------------------------------------


def test_open_webui():
    result = load("open-webui/openwebui-importer-single-chat.json")
    (conv,) = result.conversations
    assert conv.external_id is None  # id is ""
    assert conv.title == "🧠 Goldwater Rule Ethics"
    assert conv.created_at == pytest.approx(1744577557.127)  # top-level timestamp is in ms
    assert conv.messages[0].created_at == 1744577557.0  # per-message timestamp is in seconds
    # SQL-escaped apostrophes are undone because every apostrophe in the chat was doubled.
    assert "can't diagnose" in conv.messages[0].content and "''" not in texts(result)
    assert conv.messages[1].model == "deepseek/deepseek-chat:free"
    bulk = load("open-webui/librechat-openwebui-export.json")
    answers = [c.messages[-1].content for c in bulk.conversations]
    assert answers == ["255", "The weather in Paris is 18C with rain.", "Hi there!"]
    assert "<details" not in texts(bulk)


def test_open_webui_keeps_real_double_apostrophes(tmp_path):
    chat = {"title": "code", "history": {"currentId": "b", "messages": {
        "a": {"id": "a", "parentId": None, "role": "user", "content": "What's an empty string?"},
        "b": {"id": "b", "parentId": "a", "role": "assistant", "content": "In SQL it is ''."},
    }}}
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(chat))
    (conv,) = parse_file(path).conversations
    assert conv.messages[1].content == "In SQL it is ''."


def test_librechat():
    (conv,) = load("librechat/librechat-export.json").conversations
    assert alternates(conv)
    assert conv.messages[0].content.startswith("What is the fuel consumption of vw")
    assert conv.created_at == to_timestamp("2024-04-09T14:32:05.230Z")
    (tree,) = load("librechat/librechat-tree.json").conversations
    assert [m.content for m in tree.messages if m.role == "user"][1:] == ["thanks", "does coding make you happy"]
    assert "lol" not in [m.content for m in tree.messages]
    assert tree.messages[1].model == "gpt-4-turbo"


def test_chatbot_ui_grok_aistudio():
    ui = load("chatbot-ui/librechat-chatbotui-export.json")
    assert [roles(c)[0] for c in ui.conversations] == ["system", "system"]
    assert ui.conversations[0].messages[1].content == "Hello what are you able to do?"
    assert ui.conversations[1].messages[-1].model == "gpt-3.5-turbo"
    (grok,) = load("grok/openwebui-importer-grok-export.json").conversations
    assert alternates(grok)
    assert grok.messages[0].content == "Can you explain how photosynthesis works in simple terms?"
    assert {m.model for m in grok.messages if m.role == "assistant"} == {"grok-3"}
    assert grok.external_id == "9592deb7-27bc-4359-abb5-0967736999e9"
    (studio,) = load("gemini-aistudio/openwebui-importer-aistudio-thoughts.json").conversations
    assert roles(studio) == ["user", "assistant"]
    assert studio.messages[1].content.startswith("Yes, you are **absolutely correct!**")
    assert studio.messages[1].model == "gemini-3-pro-preview"
    assert "Verifying the Factorization" not in studio.messages[1].content


# --- detection, bad inputs, progress ------------------------------------------------------------------------


def test_registry_lists_formats():
    assert {"chatgpt", "claude", "llm_logs", "sharegpt", "openai_jsonl"} <= set(FORMATS)


def test_jsonl_detected_without_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": []}\n')
    assert detect_format(path) == "openai_jsonl"


def _expect_error(path: Path, kind: type[OwnlmError] = ImportFormatError, format: str | None = None) -> OwnlmError:
    with pytest.raises(kind) as info:
        parse_file(path, format)
    assert info.value.hint
    return info.value


@pytest.mark.parametrize(
    "content,words",
    [
        ("", "empty"),
        ("  \n", "empty"),
        ("42", "number"),
        ("[1, 2, 3]", "list of int"),
        ("[]", "empty list"),
        ('"hello"', "str"),
        ('{"foo": 1}', "not an export format"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_json_inputs(tmp_path, content, words):
    path = tmp_path / "export.json"
    path.write_text(content)
    error = _expect_error(path)
    assert words in error.message and str(path) in error.message
    assert "chatgpt" in error.hint or "again" in error.hint


@pytest.mark.parametrize(
    "rel",
    [
        "chatgpt/librechat-chatgpt-tree.json",
        "claude/claude-to-sqlite-example.json",
        "sharegpt/fastchat-dummy-conversation.json",
    ],
)
def test_truncated_file(tmp_path, rel):
    path = tmp_path / "cut.json"
    path.write_bytes((EXPORTS / rel).read_bytes()[:500])
    error = _expect_error(path)
    assert "truncated" in error.message


def test_missing_directory_binary_and_unknown_format(tmp_path):
    _expect_error(tmp_path / "nope.json", InvalidInput)
    error = _expect_error(tmp_path, InvalidInput)
    assert "directory" in error.message
    binary = tmp_path / "picture.png"
    binary.write_bytes(b"\x89PNG\xff\xfe\x00\x80" * 10)
    assert "UTF-8" in _expect_error(binary).message
    not_a_zip = tmp_path / "archive.zip"  # a zip's magic, then garbage
    not_a_zip.write_bytes(b"PK\x03\x04\xff\xfe\x00\x80" * 10)
    assert "damaged" in _expect_error(not_a_zip).message
    _expect_error(EXPORTS / "claude/claude-to-sqlite-example.json", InvalidInput, format="gemini-takeout")
    # A JSON file forced to be read as a database, and a database forced to be JSON.
    _expect_error(EXPORTS / "claude/claude-to-sqlite-example.json", format="llm_logs")


def test_bad_jsonl_extension(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    assert "messages" in _expect_error(path).message


def test_forced_format_mismatch_goes_to_bad():
    result = parse_file(EXPORTS / "chatgpt/librechat-chatgpt-tree.json", "claude")
    assert not result.conversations and "chat_messages" in result.bad[0].reason


def test_progress_reports_every_conversation():
    calls: list[tuple[int, int]] = []
    path = EXPORTS / "sharegpt/fastchat-dummy-conversation.json"
    parse_file(path, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (1, 500) and calls[-1] == (500, 500) and len(calls) == 500


@pytest.mark.parametrize(
    "value,expected",
    [
        (1695326273.969279, 1695326273.969279),
        (1744577557127, 1744577557.127),  # ms
        (1744577557127000, 1744577557.127),  # µs
        ("1700000000", 1700000000.0),
        ("2024-10-29T15:59:38.340028+00:00", 1730217578.340028),
        ("2024-01-15T10:00:00Z", 1705312800.0),
        ("2024-01-15T12:00:00+02:00", 1705312800.0),
        ("2024-01-15 10:00:00", 1705312800.0),  # naive: UTC (llm's datetime_utc)
        ("16:33:32 GMT+0200 (Central European Summer Time)", None),  # LibreChat exportAt
        (None, None),
        (True, None),
        ({}, None),
    ],
)
def test_timestamps(value, expected):
    result = to_timestamp(value)
    assert result == (pytest.approx(expected) if expected is not None else None)


# --- llm logs.db ----------------------------------------------------------------------------------------------

# The tables as simonw/llm's migrations leave them (m010 responses/conversations, m023 message store).
LEGACY_SCHEMA = """
create table conversations (id text primary key, name text, model text);
create table responses (
  id text primary key, model text, prompt text, system text, prompt_json text, options_json text,
  response text, response_json text, conversation_id text references conversations(id), duration_ms integer,
  datetime_utc text, input_tokens integer, output_tokens integer, token_details text, schema_id text,
  resolved_model text, reasoning text);
"""
STORE_SCHEMA = """
create table fragments (id integer primary key, hash text, content text, datetime_utc text, source text);
create table messages (hash text primary key, parent_hash text references messages(hash), role text,
  provider_metadata text);
create table parts (id integer primary key, message_hash text references messages(hash), position integer,
  type text, tool_name text, text text, payload text);
create table threads (id text primary key, name text, tip_message_hash text, forked_from text, datetime_utc text);
create table turns (id text primary key, thread_id text, parent_message_hash text, tip_message_hash text, model text,
  resolved_model text, options_json text, schema_id text, input_tokens integer, output_tokens integer,
  token_details text, duration_ms integer, datetime_utc text, response_json text);
"""


def _legacy_rows(db: sqlite3.Connection) -> None:
    db.execute("insert into conversations values ('c1', 'Pelicans', 'gpt-4o-mini')")
    rows = [
        # Inserted out of time order on purpose: the importer orders by datetime_utc.
        ("r2", "gpt-4o-mini", "And their beaks?", "Be brief.", "Big.", "c1", "2024-05-01T10:01:00"),
        ("r1", "gpt-4o-mini", "Tell me about pelicans", "Be brief.", "Large birds.", "c1", "2024-05-01T10:00:00"),
        ("r3", "gpt-4o-mini", "Now as a poem", "Be a poet.", "Pouch of the sea", "c1", "2024-05-01T10:02:00"),
        ("r4", "claude-3-haiku", "One-off question", None, "", None, "2024-05-02T09:00:00"),
    ]
    db.executemany(
        "insert into responses (id, model, prompt, system, response, conversation_id, datetime_utc)"
        " values (?,?,?,?,?,?,?)",
        rows,
    )


def _store_rows(db: sqlite3.Connection) -> None:
    db.execute("insert into fragments (id, hash, content) values (7, 'h', 'FRAGMENT TEXT')")
    messages = [
        ("m1", None, "system"), ("m2", "m1", "user"), ("m3", "m2", "assistant"),
        ("m4", "m3", "user"), ("m5", "m4", "assistant"), ("m6", "m5", "tool"), ("m7", "m6", "assistant"),
        ("x1", "m3", "user"), ("x2", "x1", "assistant"),  # a fork: thread t2 continues from m3
    ]
    db.executemany("insert into messages (hash, parent_hash, role) values (?,?,?)", messages)
    parts = [
        ("m1", 0, "text", None, "You are helpful.", None),
        ("m2", 0, "text", None, "What is 2+2?", None),
        ("m3", 0, "reasoning", None, "Easy sum.", None),
        ("m3", 1, "text", None, "4", None),
        ("m4", 0, "text", None, None, json.dumps({"text_ref": [{"literal": "Summarise: "}, {"fragment": 7}]})),
        ("m5", 0, "tool_call", "search", None, json.dumps({"name": "search", "arguments": {}})),
        ("m6", 0, "tool_result", "search", None, json.dumps({"output": "found"})),
        ("m7", 0, "text", None, "Summary done.", None),
        ("x1", 0, "text", None, "And 3+3?", None),
        ("x2", 0, "text", None, "6", None),
    ]
    db.executemany(
        "insert into parts (message_hash, position, type, tool_name, text, payload) values (?,?,?,?,?,?)", parts
    )
    db.executemany(
        "insert into threads values (?,?,?,?,?)",
        [("t1", "Sums", "m7", None, "2025-01-01T00:00:00"), ("t2", "Sums (fork)", "x2", "t1", "2025-01-02T00:00:00")],
    )
    db.executemany(
        "insert into turns (id, thread_id, parent_message_hash, tip_message_hash, model, resolved_model,"
        " datetime_utc) values (?,?,?,?,?,?,?)",
        [
            ("u1", "t1", None, "m3", "gpt-4o", "gpt-4o-2024-08-06", "2025-01-01T00:00:00"),
            ("u2", "t1", "m3", "m7", "gpt-4o", None, "2025-01-01T00:05:00"),
            ("u3", "t2", "m3", "x2", "o3", None, "2025-01-02T00:00:00"),
        ],
    )


def _make_db(path: Path, legacy: bool, store: bool) -> Path:
    db = sqlite3.connect(path)
    if legacy:
        db.executescript(LEGACY_SCHEMA)
        _legacy_rows(db)
    if store:
        db.executescript(STORE_SCHEMA)
        _store_rows(db)
    db.commit()
    db.close()
    return path


def test_llm_logs_legacy_schema(tmp_path):
    path = _make_db(tmp_path / "logs.db", legacy=True, store=False)
    before = path.read_bytes()
    assert detect_format(path) == "llm_logs"
    result = parse_file(path)
    assert path.read_bytes() == before  # opened read-only
    pelicans, one_off = result.conversations
    assert pelicans.external_id == "c1" and pelicans.title == "Pelicans"
    assert [(m.role, m.content) for m in pelicans.messages] == [
        ("system", "Be brief."),
        ("user", "Tell me about pelicans"),
        ("assistant", "Large birds."),
        ("user", "And their beaks?"),  # the repeated system prompt is not repeated
        ("assistant", "Big."),
        ("system", "Be a poet."),  # a changed system prompt is
        ("user", "Now as a poem"),
        ("assistant", "Pouch of the sea"),
    ]
    assert pelicans.messages[2].model == "gpt-4o-mini"
    assert pelicans.created_at == to_timestamp("2024-05-01T10:00:00Z")
    assert one_off.external_id == "r4" and roles(one_off) == ["user"]
    assert result.skipped == Counter({"empty": 1})


def test_llm_logs_message_store_schema(tmp_path):
    path = _make_db(tmp_path / "logs.db", legacy=False, store=True)
    os.chmod(path, 0o444)  # a read-only file still imports
    result = parse_file(path)
    t1, t2 = result.conversations
    assert t1.title == "Sums"
    assert [(m.role, m.content) for m in t1.messages] == [
        ("system", "You are helpful."),
        ("user", "What is 2+2?"),
        ("assistant", "4"),
        ("user", "Summarise: FRAGMENT TEXT"),
        ("assistant", "Summary done."),
    ]
    assert [m.model for m in t1.messages if m.role == "assistant"] == ["gpt-4o-2024-08-06", "gpt-4o"]
    assert t1.messages[3].created_at == to_timestamp("2025-01-01T00:05:00Z")
    # The fork shares the first three messages and then goes its own way.
    assert [m.content for m in t2.messages][3:] == ["And 3+3?", "6"]
    assert t2.messages[-1].model == "o3"
    assert result.skipped == Counter({"reasoning": 2, "tool_call": 1, "tool": 1})


def test_llm_logs_both_schemas_and_progress(tmp_path):
    path = _make_db(tmp_path / "logs.db", legacy=True, store=True)
    calls = []
    result = parse_file(path, progress=lambda d, t: calls.append((d, t)))
    assert [c.external_id for c in result.conversations] == ["c1", "r4", "t1", "t2"]
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_sqlite_that_is_not_llm(tmp_path):
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("create table notes (id integer)")
    db.commit()
    db.close()
    assert "not an llm logs.db" in _expect_error(path).message
    assert "SQLite" in _expect_error(path, format="chatgpt").message


def test_pretty_json_forced_to_jsonl_is_an_error():
    error = _expect_error(EXPORTS / "claude/claude-to-sqlite-example.json", format="openai_jsonl")
    assert "JSONL" in error.message


def test_llm_logs_oldest_logs_table(tmp_path):
    # llm before 0.4 (migrations m007/m008): one `logs` table, conversations grouped by chat_id.
    path = tmp_path / "logs.db"
    db = sqlite3.connect(path)
    db.execute(
        "create table logs (id integer primary key, model text, prompt text, system text, prompt_json text,"
        " options_json text, response text, response_json text, reply_to_id integer, chat_id integer,"
        " duration_ms integer, datetime_utc text)"
    )
    db.executemany(
        "insert into logs (id, model, prompt, response, chat_id, datetime_utc) values (?,?,?,?,?,?)",
        [
            (1, "gpt-3.5-turbo", "hi", "hello", None, "2023-06-01T10:00:00"),  # a chat's first row: no chat_id
            (2, "gpt-3.5-turbo", "more", "sure", 1, "2023-06-01T10:01:00"),
            (3, "gpt-4", "other", "chat", None, "2023-06-02T10:00:00"),
        ],
    )
    db.commit()
    db.close()
    conv, other = parse_file(path).conversations
    assert [m.content for m in conv.messages] == ["hi", "hello", "more", "sure"]
    assert other.messages[1].model == "gpt-4"


def test_claude_api_object_with_messages_key(tmp_path):
    data = json.loads((EXPORTS / "claude/claude-chat-viewer-api-conversation.json").read_text())
    data["messages"] = data.pop("chat_messages")
    del data["current_leaf_message_uuid"]  # the newest leaf is the same message
    path = tmp_path / "api.json"
    path.write_text(json.dumps(data))
    assert detect_format(path) == "claude"
    result = parse_file(path)
    assert result.message_count == 4 and result.conversations[0].messages[-1].role == "assistant"


# ---- exports as downloaded: a .zip ----------------------------------------------------------------------

def make_zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _counts(result: ImportResult) -> tuple:
    return result.format, len(result.conversations), result.message_count, dict(result.skipped), len(result.bad)


@pytest.mark.parametrize("rel, folder", [
    ("chatgpt/librechat-chatgpt-export.json", ""),  # ChatGPT: conversations.json beside chat.html and files
    ("claude/claude-to-sqlite-artifacts.json", "data-2025-01-31-12-00-00/"),  # Claude: inside a dated folder
])
def test_zip_export_reads_its_conversations_json(tmp_path, rel, folder):
    export = (EXPORTS / rel).read_bytes()
    path = make_zip(tmp_path / "export.zip", {
        f"{folder}user.json": b'{"id": "user-1"}', f"{folder}chat.html": b"<html></html>",
        f"{folder}conversations.json": export, f"{folder}files/conversations.json": b"[]",  # an attachment copy
        f"{folder}file-abc.png": b"\x89PNG\r\n\x1a\n" + bytes(64),
    })
    assert _counts(parse_file(path)) == _counts(parse_file(EXPORTS / rel))
    assert detect_format(path) == rel.split("/")[0]


def test_zip_of_one_export_file_and_a_forced_format(tmp_path):
    rel = "sharegpt/axolotl-conversation.json"
    path = make_zip(tmp_path / "a.zip", {"axolotl-conversation.json": (EXPORTS / rel).read_bytes()})
    assert _counts(parse_file(path)) == _counts(parse_file(EXPORTS / rel))
    jsonl = "openai-finetune/cookbook-toy-chat-fine-tuning.jsonl"
    path = make_zip(tmp_path / "b.zip", {"train.jsonl": (EXPORTS / jsonl).read_bytes()}, zipfile.ZIP_STORED)
    assert _counts(parse_file(path, "openai_jsonl")) == _counts(parse_file(EXPORTS / jsonl))


def test_zip_without_an_export_lists_what_it_holds(tmp_path):
    path = make_zip(tmp_path / "photos.zip", {"notes.txt": b"hello", "img/photo.jpg": b"\xff\xd8\xff", "readme.md": b"#"})
    error = _expect_error(path)
    assert "photos.zip" in error.message and "notes.txt" in error.message and "img/photo.jpg" in error.message
    assert "conversations.json" in error.hint
    empty = make_zip(tmp_path / "empty.zip", {})
    assert "holds nothing" in _expect_error(empty).message


def test_zip_bomb_and_oversized_members_are_refused_before_reading(tmp_path, monkeypatch):
    from ownlm.capture.importers import archive
    from ownlm.errors import PayloadTooLarge

    bomb = make_zip(tmp_path / "bomb.zip", {"conversations.json": b"[" + b" " * (32 << 20) + b"]"})
    assert bomb.stat().st_size < 200_000  # 32 MiB in a few dozen KB
    big = make_zip(tmp_path / "big.zip", {"conversations.json": (EXPORTS / "claude/claude-to-sqlite-example.json").read_bytes()})

    def never(*a, **k):
        raise AssertionError("a refused member must not be decompressed")

    monkeypatch.setattr(zipfile.ZipFile, "open", never)
    assert "zip bomb" in _expect_error(bomb, PayloadTooLarge).message
    with pytest.raises(PayloadTooLarge) as info:
        parse_file(big, max_unpacked=1000)
    assert "conversations.json" in info.value.message and "over the 1,000 bytes" in info.value.message
    assert "extract" in info.value.hint
    assert archive.MAX_MEMBER_BYTES >= 512 << 20  # the default leaves room for a heavy user's real export


def test_zip_whose_header_understates_the_size_reads_no_more(tmp_path):
    data = (EXPORTS / "chatgpt/librechat-chatgpt-export.json").read_bytes()
    raw = bytearray(make_zip(tmp_path / "x.zip", {"conversations.json": data}).read_bytes())
    central = raw.rindex(b"PK\x01\x02")  # central directory entry: uncompressed size at offset 24
    raw[central + 24:central + 28] = (100).to_bytes(4, "little")
    liar = tmp_path / "liar.zip"
    liar.write_bytes(bytes(raw))
    assert "damaged" in _expect_error(liar).message  # at most 100 bytes come out, and the CRC then fails


def test_damaged_zip(tmp_path):
    path = make_zip(tmp_path / "cut.zip", {"conversations.json": (EXPORTS / "chatgpt/librechat-chatgpt-export.json").read_bytes()})
    path.write_bytes(path.read_bytes()[:3000])  # the download stopped: no central directory
    error = _expect_error(path)
    assert "damaged" in error.message and "again" in error.hint
