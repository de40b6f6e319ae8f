"""A user's installed personal model in the formats other tools load (`ownlm export`).

- gguf-lora: `adapter.gguf`, a LoRA adapter for llama.cpp on this node's GGUF base (bitdelta/gguf_lora.py: F32
  factors, llama.cpp's tensor names and q/k row order). Run it with `llama-cli -m BASE.gguf --lora adapter.gguf`,
  or `llama-server -m BASE.gguf --lora adapter.gguf`.
- peft: `adapter_config.json` + `adapter_model.safetensors`, a PEFT LoRA adapter of the base's Hugging Face
  checkpoint (for a GGUF base, the node's safetensors conversion of it): the decompressed factors A (r, in) and
  B (out, r) in float32, in Hugging Face's row order, with the delta's r and alpha, so that peft adds exactly
  (alpha / r) B A, the weight delta the torch engine serves.
- ollama: `Modelfile` + `adapter.gguf` (the gguf-lora file). The Modelfile says `FROM <the base .gguf>` (`ollama
  create` copies it into Ollama's own store), `ADAPTER ./adapter.gguf`, the base's chat template as Ollama's
  TEMPLATE and SYSTEM, and PARAMETERs for ownlm's own sampling defaults, so that `ollama run` reads the prompt the
  node's engines read. Only ChatML chat templates (SmolLM2's, Qwen's...) are translated; for another template
  the Modelfile leaves TEMPLATE to Ollama, which takes it from the GGUF, and says so.

The delta is read back through load_delta (integrity and base fingerprint checked) before anything is written; no
file is overwritten, and the files are private (0600): they are derived from the user's conversations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ownlm.basemodel import base_sha256, checkpoint_dir, resolve_base
from ownlm.errors import DeltaMismatch, InvalidInput, NotFound
from ownlm.fsutil import atomic_write, mkdir_private

FORMATS = ("gguf-lora", "peft", "ollama")
GGUF_LORA_FILE = "adapter.gguf"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # what peft's from_pretrained reads
MODELFILE = "Modelfile"
FILES = {"gguf-lora": (GGUF_LORA_FILE,), "peft": (PEFT_CONFIG, PEFT_WEIGHTS), "ollama": (MODELFILE, GGUF_LORA_FILE)}
# ownlm's sampling defaults (engine/base.py GenerationParams) in Ollama's names, and its other samplers off
OLLAMA_PARAMETERS = {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
# ChatML as Ollama's Go template: Ollama collects system messages in .System (and, when a conversation has none,
# puts the Modelfile's SYSTEM there), so the loop skips them; the assistant turn is opened for the answer.
CHATML_TEMPLATE = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                   '{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                   '{{ end }}{{ end }}<|im_start|>assistant\n')
CHATML_STOP = "<|im_end|>"


@dataclass
class Exported:
    directory: Path
    files: list[Path]  # what was written
    model_id: str
    version: int
    base: Path  # the base it applies to: the .gguf file, or the checkpoint directory (peft)
    run: list[str] = field(default_factory=list)  # how to use it, one shell line each
    notes: list[str] = field(default_factory=list)  # what the user should know


def export_model(store, settings, user, directory: Path, fmt: str, version: str | None = None) -> Exported:
    """Write `user`'s model (`version`: an id or version number; default the one serving them) to `directory`."""
    from ownlm.bitdelta import load_delta

    if fmt not in FORMATS:
        raise InvalidInput(f"unknown export format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    model = store.model(user.id, version) if version is not None else store.active_model(user.id)
    if model is None:
        raise NotFound(f"user {user.name} is served by the base model: there is no personal model to export",
                       hint="pass --version V (see `ownlm models`)")
    source = resolve_base(settings.base)
    if fmt != "peft" and source.kind != "gguf":
        raise InvalidInput(f"a GGUF LoRA adapter needs a GGUF base, and this node's base {source.path} is a checkpoint directory",
                           hint="set base to the .gguf file the model was trained on, or export --format peft")
    delta = load_delta(model["path"], expect_base_sha256=base_sha256(source, settings.home))
    directory = Path(directory)
    targets = [directory / name for name in FILES[fmt]]
    if existing := [str(t) for t in targets if t.exists()]:
        more = f" (and {len(existing) - 1} more of the files)" if len(existing) > 1 else ""
        raise InvalidInput(f"{existing[0]} already exists{more}", hint="pass a new directory, or remove the files first")
    mkdir_private(directory)
    done = Exported(directory, targets, model["id"], model["version"], source.path)
    if fmt == "peft":
        done.base = checkpoint_dir(source, settings.home)[0]
        write_peft(delta, done.base, directory)
        done.run.append(f"python -c \"from peft import PeftModel; from transformers import AutoModelForCausalLM; "
                        f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{done.base}'), '{directory}')\"")
        return done
    from ownlm.bitdelta.gguf_lora import write_gguf_lora

    write_gguf_lora(delta, source.path, directory / GGUF_LORA_FILE)
    if fmt == "gguf-lora":
        done.run.append(f"llama-cli -m {source.path} --lora {directory / GGUF_LORA_FILE}")
        return done
    from ownlm.basemodel import load_tokenizer

    text, translated = modelfile(source.path, load_tokenizer(settings), _context(source.path))
    atomic_write(directory / MODELFILE, text)
    name = f"ownlm-{user.name}-v{model['version']}".lower()
    done.run.append(f"cd {directory} && ollama create {name} -f {MODELFILE} && ollama run {name}")
    if not translated:
        done.notes.append("the base's chat template is not ChatML: the Modelfile leaves the template to Ollama, "
                          "which reads it from the GGUF; check `ollama show --template` against the base's")
    return done


def write_peft(delta, base_dir: Path, directory: Path) -> None:
    """PEFT's two files for a lora1 `delta` (see module doc). DeltaMismatch for a dense delta (not a LoRA)."""
    from peft import LoraConfig
    from safetensors.torch import save

    from ownlm.bitdelta.lora1 import PEFT_PREFIX
    from ownlm.bitdelta.quant import dequantise

    if delta.mode != "lora1":
        raise DeltaMismatch(f"a {delta.mode} delta is not a LoRA, so it is no PEFT adapter",
                            hint="models trained by the learning loop (lora1) export; this one serves only in ownlm")
    tensors = {}
    for param, (a, b) in delta.lora_pairs().items():
        module = param.removesuffix(".weight")
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = dequantise(a).float().contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = dequantise(b).float().contiguous()  # (out, r)
    config = LoraConfig(r=delta.lora_r, lora_alpha=delta.lora_alpha, target_modules=sorted(delta.target_modules),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=str(base_dir),
                        inference_mode=True).to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set in peft's dict; its own save does the same
    atomic_write(directory / PEFT_WEIGHTS, save(tensors, metadata={"format": "pt", "ownlm.base_sha256": delta.base_sha256}))
    atomic_write(directory / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")


def modelfile(base_gguf: Path, tokenizer, context: int) -> tuple[str, bool]:
    """The Modelfile text, and whether the base's chat template was translated (ChatML) or left to Ollama."""
    system = chatml_default_system(tokenizer)
    lines = [f"# ownlm personal model: `ollama create NAME -f {MODELFILE}` in this directory",
             f"FROM {_argument(str(base_gguf))}", f"ADAPTER ./{GGUF_LORA_FILE}"]
    if system is not None:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines.append(f'PARAMETER stop "{CHATML_STOP}"')
    lines += [f"PARAMETER {k} {v}" for k, v in OLLAMA_PARAMETERS.items()]
    lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n", system is not None


def chatml_default_system(tokenizer) -> str | None:
    """If the tokenizer's chat template renders ChatML (checked on sample conversations), the system prompt it
    adds when a conversation has none ('' for none); None for any other template."""
    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def chatml(messages):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"

    turns = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "How are you?"}]
    try:
        with_system = [{"role": "system", "content": "Be brief."}, *turns]
        if render(with_system) != chatml(with_system):
            return None
        bare = render(turns)
    except Exception:  # a template that refuses these conversations (e.g. no system role) is not ChatML either
        return None
    if bare == chatml(turns):
        return ""
    head, rest = "<|im_start|>system\n", "<|im_end|>\n" + chatml(turns)
    if bare.startswith(head) and bare.endswith(rest) and '"""' not in bare:
        return bare[len(head):-len(rest)]
    return None


def _context(gguf: Path) -> int:
    """Ollama's num_ctx: what the llama.cpp engine serves (the base's context, at most MAX_CONTEXT)."""
    from ownlm.bitdelta.gguf_lora import BaseLayout
    from ownlm.engine.llama import MAX_CONTEXT

    return min(BaseLayout.read(gguf).context_length, MAX_CONTEXT)


def _argument(path: str) -> str:
    """A path as a Modelfile argument: Ollama reads an argument to the end of its line and strips the quotes off
    one that starts with one, so a path may hold spaces but no line break or leading quote."""
    if "\n" in path or "\r" in path or path.startswith('"'):
        raise InvalidInput(f"the base path {path!r} cannot be written in a Modelfile", hint="move the base GGUF")
    return path
