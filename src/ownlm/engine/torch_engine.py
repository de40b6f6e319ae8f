"""Token-by-token generation with a KV cache on a transformers causal LM.

We write the decode loop instead of calling `model.generate` with a streamer thread because a server needs
per-request seeded sampling (a private torch.Generator, not the global RNG that concurrent requests would
share), stop strings checked on decoded text, and exact token counts — and the loop is short.

Under faults: each generation runs in its own thread (GenerationStream.produced_by), holding the engine lock
in a plain function whose `finally` releases it, never across a `yield` to a consumer that may vanish. The
loop checks between steps (each decode step and each prefill chunk) whether the request was cancelled (its
client left), its deadline passed, or the node is shutting down. At most `max_waiting` generations wait for
the lock; more are refused at once with Overloaded (serial.py).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
from transformers import LogitsProcessorList

from ownlm.basemodel import BaseModel
from ownlm.engine.base import REPEAT_LAST_N, GenerationParams, GenerationStream, Message, validate_messages
from ownlm.engine.serial import SerialEngine
from ownlm.errors import Overloaded

# Prompt tokens per forward pass. Reading a long prompt is what holds the engine (one forward pass over the
# whole kept context; templating and tokenizing are small beside it, seen ad hoc, not a benchmark). In chunks, a
# cancel or the deadline can stop it between chunks, and attention scores are (heads, 512, context) rather than
# (heads, context, context); the logits are the same.
PREFILL_CHUNK = 512


class TorchEngine(SerialEngine):
    """Serves one causal LM. Requests run one at a time (a lock): on a CPU node, concurrent forward passes
    only split the same cores, and a KV cache per request would multiply memory."""

    def __init__(self, base: BaseModel, model_name: str | None = None, max_waiting: int | None = None):
        """`max_waiting`: generations allowed to wait while one runs (None: no limit, for the CLI and evaluation)."""
        super().__init__(max_waiting)
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.model_name = model_name or base.source.name
        self._eos_ids = self._end_token_ids()
        self._context = int(getattr(self.model.config, "max_position_embeddings", 2048))

    def _end_token_ids(self) -> set[int]:
        ids = set()
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        for e in eos if isinstance(eos, list) else [eos]:
            if e is not None:
                ids.add(int(e))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """Token ids of the chat-templated conversation, ending with the assistant turn's opening."""
        ids = self.tokenizer.apply_chat_template(
            validate_messages(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    @torch.inference_mode()
    def greedy_batch(self, conversations: list[list[Message]], max_tokens: int, batch_size: int = 32,
                     repetition_penalty: float = 1.0, finished: list[bool] | None = None) -> list[str]:
        """Greedy answers to many conversations at once, with the model as it is now (no per-user routing).

        For evaluation (persona probes): each decoding step reads every weight once whatever the batch size, so
        answering the probes together saves most of the per-step cost of asking them one by one. transformers'
        generate() does the batching; the answers equal stream()'s greedy answers up to float rounding between
        batch shapes (tests/test_engine.py), `repetition_penalty` included (see GenerationParams). `finished`,
        when given, gets one bool per answer: did it end by itself (end of turn) within max_tokens.
        """
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self._eos_ids)
        answers: list[str] = []
        with self._lock:
            for i in range(0, len(conversations), batch_size):
                prompts = [self.encode_chat(c) for c in conversations[i : i + batch_size]]
                width = max(len(p) for p in prompts)
                ids = torch.full((len(prompts), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for k, p in enumerate(prompts):
                    ids[k, width - len(p):], mask[k, width - len(p):] = torch.tensor(p), 1
                dev = self.base.device.device
                extra = {}
                if repetition_penalty != 1.0:
                    starts = [width - len(p) for p in prompts]
                    extra["logits_processor"] = LogitsProcessorList([RecentRepeats(repetition_penalty, starts)])
                out = self.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_tokens,
                                          do_sample=False, temperature=None, top_p=None, top_k=None,
                                          eos_token_id=sorted(self._eos_ids), pad_token_id=pad, **extra)
                for row in out[:, width:].tolist():
                    end = next((j for j, t in enumerate(row) if t in self._eos_ids), len(row))
                    if finished is not None:
                        finished.append(end < len(row))
                    answers.append(self.tokenizer.decode(row[:end], skip_special_tokens=True))
        return answers

    def stream(self, messages: list[Message], params: GenerationParams) -> GenerationStream:
        """Validate and template `messages`; generation starts at the stream's first next() (see module doc)."""
        self._refuse_if_closing()
        prompt = self.encode_chat(messages)
        # Keep the most recent context that leaves room for the answer.
        room = max(1, self._context - params.max_tokens)
        prompt = prompt[-room:]
        return GenerationStream.produced_by(functools.partial(self._generate, prompt, params), len(prompt))

    @torch.inference_mode()
    def _generate(self, prompt: list[int], params: GenerationParams, out: GenerationStream,
                  emit: Callable[[str], None]) -> None:
        """The work of one stream, in its own thread: wait for the engine, then decode, then let go of it."""
        deadline = time.monotonic() + params.timeout_s if params.timeout_s else None
        gen = torch.Generator(device=self.model.device)
        gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        if not self._acquire(out, deadline, params.timeout_s):
            return
        try:
            self._begin(out)
            try:
                self._decode(prompt, params, out, gen, emit, deadline)
            finally:
                self._end(out)
        finally:
            self._lock.release()

    def _begin(self, stream: GenerationStream) -> None:
        """Called with the engine lock held, before a request's first forward pass (subclasses select weights)."""

    def _end(self, stream: GenerationStream) -> None:
        """Called with the engine lock held when a request's generation ends, whichever way."""

    def _prefill(self, prompt: list[int], out: GenerationStream, deadline: float | None, timeout_s: float | None):
        """Read the prompt in PREFILL_CHUNK pieces; returns (KV cache, next-token logits (vocab,)), or None when
        cancelled. The deadline passing here (no answer yet) is Overloaded."""
        past, res = None, None
        for i in range(0, len(prompt), PREFILL_CHUNK):
            stop = self._should_stop(out, deadline)
            if stop == "cancelled":
                return None
            if stop == "deadline":
                raise Overloaded(f"reading the {len(prompt)}-token prompt took longer than the {timeout_s:g} s deadline",
                                 hint="send a shorter conversation, or raise generation_timeout_s in the node settings")
            chunk = torch.tensor([prompt[i : i + PREFILL_CHUNK]], device=self.model.device)
            res = self.model(input_ids=chunk, cache=past, use_cache=True, logits_to_keep=1)
            past = res.cache
        return past, res.logits[0, -1].float()

    def _decode(self, prompt: list[int], params: GenerationParams, out: GenerationStream, gen: torch.Generator,
                emit: Callable[[str], None], deadline: float | None) -> None:
        read = self._prefill(prompt, out, deadline, params.timeout_s)
        if read is None:
            out.finish_reason = "cancelled"
            return
        past, logits = read
        produced: list[int] = []
        emitted = ""
        out.finish_reason = "length"
        for step in range(params.max_tokens):
            if step:  # the first token comes from the prompt's own last logits
                stop = self._should_stop(out, deadline)
                if stop == "cancelled":
                    out.finish_reason = "cancelled"
                    return
                if stop == "deadline":
                    break  # the answer so far, as at max_tokens
                res = self.model(input_ids=torch.tensor([[token]], device=self.model.device), cache=past, use_cache=True)
                past = res.cache
                logits = res.logits[0, -1].float()  # (vocab,)
            if params.repetition_penalty != 1.0:
                # not prompt + produced: that would copy the whole prompt at every token
                recent = (prompt[-REPEAT_LAST_N:] + produced[-REPEAT_LAST_N:])[-REPEAT_LAST_N:]
                logits = penalize_repeats(logits, recent, params.repetition_penalty)
            token = _sample(logits, params, gen)
            if token in self._eos_ids:
                out.finish_reason = "stop"
                return
            produced.append(token)
            out.completion_tokens = len(produced)
            text = self.tokenizer.decode(produced, skip_special_tokens=True)
            stop_at = _find_stop(text, params.stop)
            if stop_at is not None:
                if stop_at > len(emitted):
                    emit(text[len(emitted) : stop_at])
                out.finish_reason = "stop"
                return
            # Hold back an incomplete UTF-8 sequence and any tail that could begin a stop string.
            safe = len(text) - _held_back(text, params.stop)
            if safe > len(emitted):
                emit(text[len(emitted) : safe])
                emitted = text[:safe]
        text = self.tokenizer.decode(produced, skip_special_tokens=True)
        if len(text) > len(emitted):
            emit(text[len(emitted) :])


def penalize_repeats(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    """Next-token logits (vocab,) with every token of `recent` penalised once, however often it occurs: a positive
    logit divided by `penalty`, a negative one multiplied by it (CTRL's rule, as llama.cpp's `repeat_penalty`
    applies it; transformers' RepetitionPenaltyLogitsProcessor looks at the whole sequence instead of the last
    REPEAT_LAST_N tokens, so it is not used). Returns a new tensor."""
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    out = logits.clone()
    seen = out[ids]
    out[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return out


class RecentRepeats:
    """transformers logits processor applying `penalize_repeats` to each row of a left-padded batch: row k's
    real tokens start at column starts[k], and the pad tokens before it are not part of its history."""

    def __init__(self, penalty: float, starts: list[int]):
        self.penalty, self.starts = penalty, starts

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # (B, L), (B, V)
        first = [max(s, input_ids.shape[1] - REPEAT_LAST_N) for s in self.starts]
        rows = [penalize_repeats(scores[k].float(), input_ids[k, first[k]:].tolist(), self.penalty)
                for k in range(scores.shape[0])]
        return torch.stack(rows).to(scores.dtype)


def _sample(logits: torch.Tensor, params: GenerationParams, gen: torch.Generator) -> int:
    """One token id from next-token logits (vocab,): greedy at temperature 0, else temperature + top-p."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p  # always keeps the top token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=gen))


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for s in stops if (i := text.find(s)) != -1]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to hold: a replacement char (partial UTF-8) or a stop-string prefix."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
