"""Token-by-token generation with a KV cache on a transformers causal LM.

We write the decode loop instead of calling `model.generate` with a streamer thread because a server needs
per-request seeded sampling (a private torch.Generator, not the global RNG that concurrent requests would
share), stop strings checked on decoded text, and exact token counts — and the loop is short.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from ownlm.basemodel import BaseModel
from ownlm.engine.base import GenerationParams, GenerationStream, Message, validate_messages


class TorchEngine:
    """Serves one causal LM. Requests run one at a time (a lock): on a CPU node, concurrent forward passes
    only split the same cores, and a KV cache per request would multiply memory."""

    def __init__(self, base: BaseModel, model_name: str | None = None):
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.model_name = model_name or base.source.name
        self._lock = threading.Lock()
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
    def greedy_batch(self, conversations: list[list[Message]], max_tokens: int, batch_size: int = 32) -> list[str]:
        """Greedy answers to many conversations at once, with the model as it is now (no per-user routing).

        For evaluation (persona probes): each decoding step reads every weight once whatever the batch size, so
        answering the probes together saves most of the per-step cost of asking them one by one. transformers'
        generate() does the batching; the answers equal stream()'s greedy answers up to float rounding between
        batch shapes (tests/test_engine.py).
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
                out = self.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_tokens,
                                          do_sample=False, temperature=None, top_p=None, top_k=None,
                                          eos_token_id=sorted(self._eos_ids), pad_token_id=pad)
                for row in out[:, width:].tolist():
                    end = next((j for j, t in enumerate(row) if t in self._eos_ids), len(row))
                    answers.append(self.tokenizer.decode(row[:end], skip_special_tokens=True))
        return answers

    def stream(self, messages: list[Message], params: GenerationParams) -> GenerationStream:
        prompt = self.encode_chat(messages)
        # Keep the most recent context that leaves room for the answer.
        room = max(1, self._context - params.max_tokens)
        prompt = prompt[-room:]
        stream = GenerationStream(iter(()), len(prompt))
        stream._pieces = self._pieces(prompt, params, stream)
        return stream

    @torch.inference_mode()
    def _pieces(self, prompt: list[int], params: GenerationParams, out: GenerationStream) -> Iterator[str]:
        gen = torch.Generator(device=self.model.device)
        gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        with self._lock:
            self._begin(out)
            try:
                yield from self._decode(prompt, params, out, gen)
            finally:
                self._end(out)

    def _begin(self, stream: GenerationStream) -> None:
        """Called with the engine lock held, before a request's first forward pass (subclasses select weights)."""

    def _end(self, stream: GenerationStream) -> None:
        """Called with the engine lock held when a request's stream ends or is closed."""

    def _decode(self, prompt: list[int], params: GenerationParams, out: GenerationStream, gen: torch.Generator) -> Iterator[str]:
        input_ids = torch.tensor([prompt], device=self.model.device)
        past = None
        produced: list[int] = []
        emitted = ""
        out.finish_reason = "length"
        for _ in range(params.max_tokens):
            res = self.model(input_ids=input_ids, cache=past, use_cache=True)
            past = res.cache
            logits = res.logits[0, -1].float()  # (vocab,)
            token = _sample(logits, params, gen)
            if token in self._eos_ids:
                out.finish_reason = "stop"
                break
            produced.append(token)
            out.completion_tokens = len(produced)
            text = self.tokenizer.decode(produced, skip_special_tokens=True)
            stop_at = _find_stop(text, params.stop)
            if stop_at is not None:
                if stop_at > len(emitted):
                    yield text[len(emitted) : stop_at]
                out.finish_reason = "stop"
                break
            # Hold back an incomplete UTF-8 sequence and any tail that could begin a stop string.
            safe = len(text) - _held_back(text, params.stop)
            if safe > len(emitted):
                yield text[len(emitted) : safe]
                emitted = text[:safe]
            input_ids = torch.tensor([[token]], device=self.model.device)
        else:
            text = self.tokenizer.decode(produced, skip_special_tokens=True)
            if len(text) > len(emitted):
                yield text[len(emitted) :]


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
