"""The engine protocol on llama.cpp (through xllamacpp): the base's GGUF, with every routed user's personal model
loaded as a LoRA adapter of the same llama.cpp server and chosen per request.

On CPU, llama.cpp generates several times the torch engine's tokens/s on the shipped Q4_1 GGUF (issue 17), and
an adapter costs two thin matmuls per adapted layer.

How a request runs:
- The conversation is templated and tokenized by the base's own tokenizer and chat template (what the torch
  engine uses, read from the same GGUF), trimmed to the context as the torch engine trims it, and sent to
  llama.cpp's completion handler as token ids: both engines read exactly the same prompt.
- Adapters: the request field "lora": [{"id": i, "scale": s}] (llama.cpp PR #10994). An empty list means "the
  server's global scales", not "base", and unknown ids are ignored, so every request lists every loaded adapter:
  scale 1 for the request's model, 0 for the others, all 0 for the base (adapters load at global scale 0 too).
  llama.cpp scales an adapter by scale * alpha / r: 1 is peft's scaling (bitdelta/gguf_lora.py).
- Sampling as the torch engine samples: temperature, then top-p over the tempered distribution (samplers
  ["temperature", "top_p"]), after llama.cpp's repetition penalty when one is asked for, every other sampler
  off; temperature 0 is greedy; the seed is reduced to llama.cpp's 32 bits. Stop strings, max_tokens and the end-of-turn token are llama.cpp's own; the text comes in
  pieces through a streaming callback, whose return value ends the generation early (cancel, deadline, shutdown).
- Prompt cache: cache_ram_mib = 0. Trap 2 of issue 17: llama-server's RAM prompt cache restores KV computed
  under another adapter (llama.cpp issue #26207). What is left is the one slot's own KV, reused for a shared
  prefix only under the same adapter list (llama.cpp clears it when the list changes), so a follow-up turn does
  not re-read the conversation.
- One generation at a time with a bounded line (serial.py), as in the torch engine: the same deadlines,
  Overloaded and shutdown behaviour on both. Known gap: llama.cpp calls back once per token, so a cancel or a
  deadline during the reading of a long prompt takes effect when that reading ends.

llama.cpp loads adapters only when a server starts, so another set of personal models is another server:
`load_adapters` builds it while the current one serves and swaps them between two generations. The adapter
files (derived from users' conversations) are written to a private temporary directory and removed once loaded.
With many users, the adapters are spread over replicas (servers of the same base in this process) of at most
`max_adapters` each (replicas.py): a request goes to the replica holding its model, and a deploy rebuilds that
replica alone, so its cost does not grow with the node's users. Replicas share the GGUF's mapped weights; each
has its own KV cache. Generation stays one at a time across them (serial.py): on a CPU node they share its cores.

The xllamacpp server also listens on a random 127.0.0.1 port for HTTP. It gets a random API key and no /slots
endpoint, so that port tells other local processes nothing but /health.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ownlm.bitdelta.gguf_lora import BaseLayout
from ownlm.engine.base import REPEAT_LAST_N, GenerationParams, GenerationStream, Message, validate_messages
from ownlm.engine.replicas import assign
from ownlm.engine.routing import RoutedEngine
from ownlm.engine.serial import SerialEngine
from ownlm.errors import EngineUnavailable, InvalidInput, ModelUnavailable, Overloaded

MAX_CONTEXT = 8192  # tokens of KV per server (SmolLM2-135M: 188 MB at f16); the torch engine's context
SEED_SPACE = 0xFFFFFFFF  # llama.cpp seeds are uint32, and 0xFFFFFFFF means "pick one at random"
SAMPLERS = ["temperature", "top_p"]  # the torch engine's order (torch_engine._sample)
# llama.cpp samplers the torch engine does not have, each set to its no-op value
SAMPLING_OFF = {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "top_n_sigma": -1.0, "repeat_penalty": 1.0,
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0,
                "mirostat": 0}


def xllamacpp():
    """The xllamacpp module, or EngineUnavailable saying how to get it."""
    try:
        import xllamacpp as xl
    except ImportError:
        raise EngineUnavailable("the llama.cpp engine needs the package xllamacpp, which is not installed",
                                hint='run `pip install xllamacpp` (make setup installs it), or set engine = "torch"') from None
    return xl


class LlamaServer:
    """One llama.cpp server in this process: the base GGUF, these adapters at global scale 0, one slot."""

    def __init__(self, gguf: Path, adapters: list[Path], threads: int, context: int):
        xl = xllamacpp()
        p = xl.CommonParams()
        p.model.path = str(gguf)
        p.n_ctx = context
        p.n_parallel = 1  # one generation at a time (serial.py): one slot, one KV cache
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads
        p.n_threads_http = 1
        p.cache_ram_mib = 0  # see the module doc (trap 2)
        p.verbosity = -1  # llama.cpp logs every request on stderr otherwise
        p.api_keys = [secrets.token_hex(32)]  # see the module doc (its HTTP port)
        p.endpoint_slots = False
        p.lora_adapters = [xl.CommonAdapterLoraInfo(str(a), 0.0) for a in adapters]
        try:
            self._server = xl.Server(p)
        except RuntimeError as e:  # xllamacpp says only "Failed to init server"
            raise EngineUnavailable(f"llama.cpp could not load {gguf} with {len(adapters)} adapter(s): {e}",
                                    hint='check the GGUF file, or set engine = "torch"') from None

    def complete(self, request: dict, on_chunk: Callable[[dict], bool] | None = None) -> dict | None:
        """llama.cpp's OpenAI-style completion. With `on_chunk` it streams: each chunk is passed to it, and a
        True return ends the generation. Without, returns the whole answer (or {'error': ...})."""
        if on_chunk is None:
            return self._server.handle_completions({**request, "stream": False})
        self._server.handle_completions({**request, "stream": True}, on_chunk)
        return None


@dataclass(eq=False)
class Replica:
    """One llama.cpp server and the adapters it holds, {key: llama.cpp adapter id} in load order."""

    server: LlamaServer
    ids: dict[Hashable, int]


class LlamaEngine(SerialEngine):
    """Serves a base GGUF and a set of LoRA adapters ({key: adapter GGUF}); `stream(..., adapter=key)`."""

    def __init__(self, gguf: str | Path, tokenizer, model_name: str, adapters: dict[Hashable, Path] | None = None,
                 threads: int | None = None, context: int | None = None, max_waiting: int | None = None,
                 max_adapters: int | None = None):
        """`tokenizer`: the base's Hugging Face tokenizer (basemodel.load_tokenizer), for its chat template.
        `threads`: llama.cpp threads (default: physical cores). `context`: tokens (default: the GGUF's, at most
        MAX_CONTEXT). `max_adapters`: most adapters per replica (None: one replica holds them all)."""
        from ownlm.device import physical_cores

        super().__init__(max_waiting)
        self.gguf = Path(gguf)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.threads = threads or physical_cores()
        self.max_adapters = max_adapters
        self._context = context or min(BaseLayout.read(self.gguf).context_length, MAX_CONTEXT)
        self._replicas = self._build_all(adapters or {})

    def _build(self, adapters: dict[Hashable, Path]) -> Replica:
        keys = list(adapters)
        server = LlamaServer(self.gguf, [Path(adapters[k]) for k in keys], self.threads, self._context)
        return Replica(server, {k: i for i, k in enumerate(keys)})

    def _build_all(self, adapters: dict[Hashable, Path]) -> list[Replica]:
        return [self._build({k: adapters[k] for k in keys}) for keys in assign([], adapters, self.max_adapters)]

    def load_adapters(self, adapters: dict[Hashable, Path]) -> None:
        """Serve these adapters (and only these) from the next generation on. The new replicas are built while
        the current ones serve; the files may be deleted once this returns."""
        replicas = self._build_all(adapters)
        with self._lock:  # between two generations
            retired, self._replicas = list(self._replicas), replicas
        _retire(retired)

    @property
    def adapters(self) -> list[Hashable]:
        return [k for r in self._replicas for k in r.ids]

    @property
    def replicas(self) -> list[list[Hashable]]:
        """Each replica's adapter keys, in load order."""
        return [list(r.ids) for r in self._replicas]

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """Token ids of the chat-templated conversation, ending with the assistant turn's opening."""
        ids = self.tokenizer.apply_chat_template(
            validate_messages(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    def stream(self, messages: list[Message], params: GenerationParams, adapter: Hashable | None = None) -> GenerationStream:
        """Validate and template `messages`; generation starts at the stream's first next(). `adapter`: the key
        of a loaded adapter, None for the base."""
        self._refuse_if_closing()
        prompt = self.encode_chat(messages)
        prompt = prompt[-max(1, self._context - params.max_tokens):]  # the most recent context, room for the answer
        stream = GenerationStream.produced_by(functools.partial(self._generate, prompt, params), len(prompt))
        stream.adapter = adapter
        return stream

    def _target(self, stream: GenerationStream) -> Hashable | None:
        """With the engine lock held: the adapter that answers this stream (subclasses route)."""
        return stream.adapter

    def _lora(self, key: Hashable | None) -> tuple[Replica, list[dict]]:
        """The replica that serves `key` (None: the base, any replica) and the request's adapter list: every
        adapter loaded there, scale 1 for `key` and 0 for the others."""
        replica = self._replicas[0] if key is None else next((r for r in self._replicas if key in r.ids), None)
        if replica is None:
            raise ModelUnavailable(f"personal model {key} is not loaded in this node's llama.cpp engine",
                                   hint="retry in a moment (it is being loaded), or ask for model 'base'")
        return replica, [{"id": i, "scale": 1.0 if k == key else 0.0} for k, i in replica.ids.items()]

    def _generate(self, prompt: list[int], params: GenerationParams, out: GenerationStream,
                  emit: Callable[[str], None]) -> None:
        """The work of one stream, in its own thread: wait for the engine, generate, let go of it."""
        deadline = time.monotonic() + params.timeout_s if params.timeout_s else None
        if not self._acquire(out, deadline, params.timeout_s):
            return
        try:
            replica, lora = self._lora(self._target(out))
            request = {"prompt": prompt, "max_tokens": params.max_tokens, "temperature": params.temperature,
                       "top_p": params.top_p, "stop": list(params.stop), "seed": _seed(params.seed),
                       **sampling(params), "lora": lora, "cache_prompt": True, "n_probs": 0}
            self._run(replica.server, request, params, out, emit, deadline)
        finally:
            self._lock.release()

    def _run(self, server: LlamaServer, request: dict, params: GenerationParams, out: GenerationStream,
             emit: Callable[[str], None], deadline: float | None) -> None:
        state: dict = {"stop": None, "error": None, "failure": None, "began": False}

        def on_chunk(chunk: dict) -> bool:
            # Called by llama.cpp's thread for each token; it must not raise (nothing would catch it there).
            try:
                if "choices" not in chunk:
                    state["error"] = chunk.get("error", chunk)
                    return True
                choice = chunk["choices"][0]
                final = choice.get("finish_reason")  # only on the last chunk, which has the exact token count
                if not final and (stop := self._why_stop(out, deadline)) is not None:
                    state["stop"] = stop
                    return True
                if choice.get("text"):
                    emit(choice["text"])
                    state["began"] = True
                    out.completion_tokens += 0 if final else 1  # a chunk per token until the last one corrects it
                if final:
                    out.finish_reason = "length" if final == "length" else "stop"
                    if chunk.get("usage"):
                        out.completion_tokens = int(chunk["usage"]["completion_tokens"])
                return False
            except BaseException as e:  # raised again below, in the stream's thread
                state["failure"] = e
                return True

        out.finish_reason = None
        server.complete(request, on_chunk)
        if state["failure"] is not None:
            raise state["failure"]
        if state["error"] is not None:
            raise _llama_error(state["error"])
        stop = state["stop"]
        if stop == "closing":
            self._refuse_if_closing()
        if stop == "cancelled":
            out.finish_reason = "cancelled"
        elif stop == "deadline":
            if not state["began"]:
                raise Overloaded(f"reading the {len(request['prompt'])}-token prompt took longer than the "
                                 f"{params.timeout_s:g} s deadline",
                                 hint="send a shorter conversation, or raise generation_timeout_s in the node settings")
            out.finish_reason = "length"  # the answer so far, as at max_tokens
        elif out.finish_reason is None:
            out.finish_reason = "length"

    def _why_stop(self, out: GenerationStream, deadline: float | None) -> str | None:
        """'closing', 'cancelled', 'deadline' or None (serial._should_stop without raising)."""
        try:
            return self._should_stop(out, deadline)
        except ModelUnavailable:
            return "closing"

    def next_token_logprobs(self, ids: list[int], positions: range, k: int, adapter: Hashable | None = None) -> list[dict[int, float]]:
        """Teacher forcing: for each t in `positions`, llama.cpp's top-k log-probabilities of the token after
        ids[:t], {token id: log p} (a softmax over the whole vocabulary of the raw logits, before sampling)."""
        out = []
        with self._lock:
            replica, lora = self._lora(adapter)
            for t in positions:
                res = replica.server.complete({"prompt": ids[:t], "max_tokens": 1, "temperature": 0.0, "n_probs": k,
                                             "samplers": SAMPLERS, **SAMPLING_OFF, "lora": lora, "cache_prompt": True})
                if "choices" not in res:
                    raise _llama_error(res.get("error", res))
                top = res["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                out.append({int(d["id"]): float(d["logprob"]) for d in top})
        return out


class LlamaPersonalEngine(RoutedEngine, LlamaEngine):
    """A LlamaEngine that answers each user with their personal model, as the torch PersonalEngine does: the
    routing table says which model answers each user (routing.py); the routed models are the loaded adapters."""

    def __init__(self, gguf: str | Path, tokenizer, store, base_sha256: str, base_name: str, model_name: str = "ownlm",
                 threads: int | None = None, max_waiting: int | None = None, max_adapters: int | None = None):
        self.store = store
        self.base_sha256 = base_sha256
        self.base_name = base_name
        self.gguf = Path(gguf)
        self._refresh_lock = threading.RLock()
        self._routes = self._stored_routes()
        with self._adapter_files(_routed(self._routes)) as paths:
            super().__init__(gguf, tokenizer, model_name, adapters=paths, threads=threads, max_waiting=max_waiting,
                             max_adapters=max_adapters)

    @contextlib.contextmanager
    def _adapter_files(self, wanted: list[tuple[str, str]]) -> Iterator[dict[tuple[str, str], Path]]:
        """These models' deltas (checked against the base) as GGUF LoRA files in a private temporary directory,
        removed on leaving: {(user id, model id): path}."""
        from ownlm.bitdelta import load_delta
        from ownlm.bitdelta.gguf_lora import write_gguf_lora
        from ownlm.fsutil import mkdir_private

        if not wanted:
            yield {}
            return
        layout = BaseLayout.read(self.gguf)
        scratch = mkdir_private(Path(self.store.home) / "cache")
        with tempfile.TemporaryDirectory(dir=scratch, prefix=".llama-adapters-") as tmp:
            paths = {}
            for i, key in enumerate(wanted):
                delta = load_delta(self.store.model(*key)["path"], expect_base_sha256=self.base_sha256)
                paths[key] = write_gguf_lora(delta, self.gguf, Path(tmp) / f"{i}.gguf", layout)
            yield paths

    def refresh(self, user_id: str | None = None) -> None:
        """Re-read the routing table (all users); when the routed models changed, build the replicas whose
        adapters changed (replicas.assign: a user's new version replaces their old one in its replica) while the
        current ones serve, and swap them in."""
        with self._refresh_lock:
            routes = self._stored_routes()
            current = self.replicas
            plan = assign(current, _routed(routes), self.max_adapters, group=lambda key: key[0])
            if plan == current:
                self._routes = routes
                return
            keep = {tuple(r.ids): r for r in self._replicas}
            todo = [keys for keys in plan if tuple(keys) not in keep]
            with self._adapter_files([k for keys in todo for k in keys]) as paths:
                built = {tuple(keys): self._build({k: paths[k] for k in keys}) for keys in todo}
            replicas = [keep.get(tuple(keys)) or built[tuple(keys)] for keys in plan]
            with self._lock:  # between two generations
                retired = [r for r in self._replicas if all(r is not n for n in replicas)]
                self._replicas, self._routes = replicas, routes
            _retire(retired)

    def stream(self, messages: list[Message], params: GenerationParams, user_id: str | None = None,
               use: str = "personal") -> GenerationStream:
        return self.addressed(super().stream(messages, params), user_id, use)

    def _generate(self, prompt, params, out, emit) -> None:
        self.follow_store()  # an install by another process: its server is built before this generation waits
        super()._generate(prompt, params, out, emit)

    def _target(self, stream: GenerationStream) -> tuple[str, str] | None:
        return self.route(stream)  # with the engine lock held: routes and loaded adapters agree


def load_llama_engine(settings, store, max_waiting: int | None = None) -> LlamaPersonalEngine:
    """The llama.cpp engine for these node settings: the configured GGUF base, its tokenizer, the store's routes."""
    from ownlm.basemodel import base_sha256, load_tokenizer, resolve_base

    xllamacpp()  # the clear error first, before the tokenizer's load
    source = resolve_base(settings.base)
    if source.kind != "gguf":
        raise EngineUnavailable(f"the llama.cpp engine serves GGUF bases, and base {source.path} is a checkpoint directory",
                                hint='set engine = "torch", or base to a .gguf file (or "embedded")')
    return LlamaPersonalEngine(source.path, load_tokenizer(settings), store, base_sha256(source, settings.home),
                               source.name, threads=settings.threads, max_waiting=max_waiting,
                               max_adapters=settings.max_adapters_per_replica)


def _routed(routes: dict[str, tuple[str, str] | None]) -> list[tuple[str, str]]:
    """The models a routing table names, sorted."""
    return sorted({k for k in routes.values() if k})


def _retire(holder: list) -> None:
    """Let go of the replaced replicas (the only references to their servers, in `holder`) in a thread of its
    own. Tearing a llama.cpp server down stops its threads and frees its context, which a deploy would otherwise wait for
    before the new version's first token (and, under the engine lock, every waiting request with it)."""
    threading.Thread(target=holder.clear, name="ownlm-llama-retire", daemon=True).start()


def sampling(params: GenerationParams) -> dict:
    """The request's sampler chain and settings: the torch engine's (SAMPLERS), behind llama.cpp's penalties
    sampler when a repetition penalty is asked for. llama-server feeds the prompt's tokens into the sampler's
    history, so the penalty sees the last REPEAT_LAST_N tokens of prompt + answer, as torch_engine does."""
    if params.repetition_penalty == 1.0:
        return {"samplers": SAMPLERS, **SAMPLING_OFF}
    return {"samplers": ["penalties", *SAMPLERS], **SAMPLING_OFF, "repeat_penalty": params.repetition_penalty,
            "repeat_last_n": REPEAT_LAST_N}


def _seed(seed: int | None) -> int:
    """A request's seed (0..2**63, or None: random) as a llama.cpp seed (0..2**32 - 2)."""
    return secrets.randbelow(SEED_SPACE) if seed is None else seed % SEED_SPACE


def _llama_error(error: dict) -> Exception:
    """llama.cpp's {'code', 'message', 'type'} as an exception: a request it refuses is the caller's, else a bug."""
    message = str(error.get("message", error))
    if error.get("code") == 400:
        return InvalidInput(f"llama.cpp refused the request: {message}", hint="send a shorter or different conversation")
    return RuntimeError(f"llama.cpp failed: {message}")
