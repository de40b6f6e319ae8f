"""`ownlm export --format peft | ollama DIR` (issue 17 item 4) on the tiny random Llama.

peft: the exported directory loads with peft onto the base checkpoint and gives the torch engine's logits.
ollama: Ollama is not installed here (nor Go), so the Modelfile is checked against Ollama's documented syntax by a
small reader below, its TEMPLATE evaluated by a reader of the few Go template actions it uses and compared with
the base's own chat template on several conversations, and its adapter is the gguf-lora export (which
tests/test_export_gguf.py serves in llama.cpp).
"""

from __future__ import annotations

import json
import re

import gguf
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from ownlm.basemodel import base_sha256, load_base, resolve_base
from ownlm.cli import cli
from ownlm.engine.personal import PersonalEngine
from ownlm.errors import InvalidInput
from ownlm.node.export import OLLAMA_PARAMETERS, modelfile
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.conftest import make_tiny_delta
from tests.test_llama_engine import gguf_delta
from tests.test_personal_engine import GREEDY, Q, deploy
from tests.tiny_gguf import place_conversion, write_tiny_gguf

# Modelfile instructions and PARAMETER names (Ollama's Modelfile reference)
INSTRUCTIONS = {"from", "parameter", "template", "system", "adapter", "license", "message", "requires"}
PARAMETERS = {"mirostat", "mirostat_eta", "mirostat_tau", "num_ctx", "repeat_last_n", "repeat_penalty", "temperature",
              "seed", "stop", "num_predict", "top_k", "top_p", "min_p"}


@pytest.fixture(scope="module")
def strong(tiny_base, tmp_path_factory):
    return make_tiny_delta(tiny_base, tmp_path_factory.mktemp("strong"), seed=1, scale=30.0)


def all_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def test_peft_export_loads_in_peft_with_the_torch_engines_logits(home, tiny_base, strong, tmp_path, monkeypatch):
    from peft import PeftModel

    monkeypatch.setenv("OWNLM_BASE", str(tiny_base))
    settings = load_settings(device="cpu")
    with Store(home) as store:
        alice = store.create_user("alice")
        mid = deploy(store, settings, alice, strong, 1)
        engine = PersonalEngine(load_base(settings), store)  # one user: the delta merged
        ids = engine.encode_chat(Q) + engine.tokenizer.encode(" The sea is large and blue.")
        stream = engine.stream(Q, GREEDY, user_id=alice.id)
        with engine._lock:  # the engine's request path for alice (routing, hooks if any)
            engine._begin(stream)
            try:
                want = all_logits(engine.model, ids)
            finally:
                engine._end(stream)
    out = tmp_path / "peft"
    result = CliRunner().invoke(cli, ["export", "--format", "peft", str(out)])
    assert result.exit_code == 0, result.output
    assert mid in result.output and "PeftModel.from_pretrained" in result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base) and config["r"] == 8 and config["lora_alpha"] == 16
    assert all((out / f).stat().st_mode & 0o777 == 0o600 for f in ("adapter_config.json", "adapter_model.safetensors"))

    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32).eval()
    plain = all_logits(base, ids)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    got = all_logits(peft_model, ids)
    assert (plain - want).abs().max() > 0.5  # the delta matters
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_ollama_export_modelfile(home, tiny_base, strong, tmp_path, monkeypatch):
    gguf_path = write_tiny_gguf(tiny_base, tmp_path / "tiny.gguf")
    place_conversion(tiny_base, gguf_path, home)
    monkeypatch.setenv("OWNLM_BASE", str(gguf_path))
    settings = load_settings()
    with Store(home) as store:
        alice = store.create_user("alice")
        deploy(store, settings, alice, gguf_delta(strong, base_sha256(resolve_base(str(gguf_path)), home), tmp_path / "d"), 1)
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "--format", "ollama", str(tmp_path / "ollama")])
    assert result.exit_code == 0, result.output
    assert "ollama create ownlm-alice-v1 -f Modelfile" in result.output
    assert runner.invoke(cli, ["export", "--format", "gguf-lora", str(tmp_path / "lora")]).exit_code == 0
    folder = tmp_path / "ollama"
    assert (folder / "adapter.gguf").read_bytes() == (tmp_path / "lora" / "adapter.gguf").read_bytes()
    assert all((folder / f).stat().st_mode & 0o777 == 0o600 for f in ("Modelfile", "adapter.gguf"))

    commands = read_modelfile((folder / "Modelfile").read_text())
    single = {name: args for name, args in commands if name != "parameter"}
    assert single["from"] == str(gguf_path)
    assert (folder / single["adapter"]).resolve() == (folder / "adapter.gguf").resolve()
    params = [args.split(" ", 1) for name, args in commands if name == "parameter"]
    assert all(p in PARAMETERS for p, _ in params)
    assert {p: float(v) for p, v in params if p not in ("stop", "num_ctx")} == OLLAMA_PARAMETERS
    assert dict(params)["num_ctx"] == "512" and ["stop", "<|im_end|>"] in params  # the tiny base's context

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    for messages in ([{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!\nHow can I help?"},
                      {"role": "user", "content": "Tell me about the sea."}]):
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(single["template"], single.get("system", ""), messages) == want, messages

    peft_out = runner.invoke(cli, ["export", "--format", "peft", str(tmp_path / "peft")])  # a GGUF base: its conversion
    assert peft_out.exit_code == 0, peft_out.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(home / "cache" / "base" / base_sha256(resolve_base(str(gguf_path)), home))
    again = runner.invoke(cli, ["export", "--format", "ollama", str(folder)])
    assert isinstance(again.exception, InvalidInput) and "already exists" in str(again.exception)
    assert gguf.GGUFReader(str(folder / "adapter.gguf")).get_field("general.type").contents() == "adapter"


def test_a_template_that_is_not_chatml_is_left_to_ollama(tiny_base, tmp_path):
    gguf_path = write_tiny_gguf(tiny_base, tmp_path / "tiny.gguf")
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    tok.chat_template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
                         "<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n")
    text, translated = modelfile(gguf_path, tok, 512)
    names = [name for name, _ in read_modelfile(text)]
    assert not translated and "template" not in names and "system" not in names and names[:2] == ["from", "adapter"]
    tok.chat_template = tok.chat_template.replace("<|start_header_id|>", "<|im_start|>")  # close to ChatML, but not it
    assert not modelfile(gguf_path, tok, 512)[1]


def read_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs, as Ollama's Modelfile reference describes the file: one instruction per line
    (case-insensitive), `#` comments, an argument to the end of its line, or between \"\"\" that may span lines,
    or between \" on one line; FROM is required. Raises AssertionError for anything else."""
    commands, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        name, _, arg = line.partition(" ")
        assert name.lower() in INSTRUCTIONS, f"unknown instruction {name!r}"
        name, arg = name.lower(), arg.strip()
        if name == "parameter":
            key, _, arg = arg.partition(" ")
            assert re.fullmatch(r"[A-Za-z0-9_]+", key), key
            arg = arg.strip()
        if arg.startswith('"""'):
            body = arg[3:]
            while not body.endswith('"""'):
                assert i < len(lines), 'unterminated """'
                body += "\n" + lines[i]
                i += 1
            arg = body[:-3]
            assert '"""' not in arg
        elif arg.startswith('"'):
            assert arg.endswith('"') and len(arg) >= 2, f"unterminated quote: {arg}"
            arg = arg[1:-1]
        assert arg, f"{name} without an argument"
        commands.append((name, f"{key} {arg}" if name == "parameter" else arg))
    assert any(name == "from" for name, _ in commands), "no FROM"
    return commands


def ollama_prompt(template: str, system: str, messages: list[dict]) -> str:
    """The prompt Ollama builds for a chat: the Modelfile's SYSTEM put first when the conversation starts with
    no system message, .System the system messages' contents, .Messages all of them, then `template` run with
    Go's text/template semantics for the actions it uses (if / ne / range / end / fields), which this evaluates."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    data = {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    parts = re.split(r"{{\s*(.*?)\s*}}", template)  # text, action, text, action, ...

    def run(pos: int, scope: dict, out: list[str] | None) -> int:
        """Evaluate from parts[pos] until an unmatched `end` (returns the index after it) or the end."""
        while pos < len(parts):
            if pos % 2 == 0:
                if out is not None:
                    out.append(parts[pos])
                pos += 1
                continue
            action = parts[pos]
            pos += 1
            if action == "end":
                return pos
            if m := re.fullmatch(r"if \.(\w+)", action):
                pos = run(pos, scope, out if out is not None and scope[m[1]] else None)
            elif m := re.fullmatch(r'if ne \.(\w+) "([^"]*)"', action):
                pos = run(pos, scope, out if out is not None and scope[m[1]] != m[2] else None)
            elif m := re.fullmatch(r"range \.(\w+)", action):
                body, after = pos, run(pos, scope, None)
                for item in scope[m[1]] if out is not None else []:
                    run(body, {**scope, **item}, out)
                pos = after
            elif m := re.fullmatch(r"\.(\w+)", action):
                if out is not None:
                    out.append(scope[m[1]])
            else:
                raise AssertionError(f"template action {action!r} is not one this reader knows")
        return pos

    out: list[str] = []
    run(0, data, out)
    return "".join(out)
