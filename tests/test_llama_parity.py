"""Parity of the two engines on the real embedded model (issue 17, item 3): llama.cpp on the shipped Q4_1 GGUF with
a user's delta as a GGUF LoRA adapter, against the torch engine on the same GGUF dequantised to fp32 with the same
delta merged. Exact equality is not expected (llama.cpp runs Q4_1 x Q8 kernels, f16 KV); the test states the
figures it sees and bounds them.

The delta is made as the trainer makes one, on the real model: a peft LoRA r=8 on q/k/v (k too, for llama.cpp's
KV-head row order), compressed to lora1 signs + scales and saved. Its B is random, large enough that the personal
model's next token differs from the base's at about a quarter of the positions (the delta visibly matters).

Teacher forcing on each model's own greedy answer (llama.cpp's, which is cheap): at every answer position both
engines give next-token log-probabilities for the same prefix; agreement is the share of positions where their
top-1 tokens are equal, |d log p| the difference of the teacher token's log-probability.
"""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["What should I cook tonight?", "Tell me about the sea.", "How do I learn to play the guitar?",
           "Write a short note to a friend who moved away.", "Why is the sky blue?"]
ANSWER_TOKENS = 24  # teacher-forced positions per prompt: the greedy answer's
TOP_K = 20


@pytest.fixture(scope="module")
def real(embedded_checkpoint, model_cache_home, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ownlm.basemodel import base_sha256, embedded_gguf_path, resolve_base
    from ownlm.bitdelta import CompressConfig, compress_lora, load_delta, read_adapter, save_delta

    root = tmp_path_factory.mktemp("parity")
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(str(embedded_checkpoint), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)  # 0.02: 96% of greedy tokens as the base's; 0.2: 72%
    peft_model.save_pretrained(root / "adapter")
    sha = base_sha256(resolve_base("embedded"), model_cache_home)
    save_delta(compress_lora(read_adapter(root / "adapter"), CompressConfig(mode="lora1"), sha), root / "delta")
    return {"gguf": embedded_gguf_path(), "checkpoint": embedded_checkpoint, "delta": load_delta(root / "delta"),
            "tok": AutoTokenizer.from_pretrained(str(embedded_checkpoint)), "root": root}


def torch_model(real, personal: bool):
    from transformers import AutoModelForCausalLM

    from ownlm.bitdelta import apply

    model = AutoModelForCausalLM.from_pretrained(str(real["checkpoint"]), dtype=torch.float32).eval()
    if personal:
        apply(model, real["delta"])
    return model


def teacher_sequences(llama, adapter) -> list[tuple[list[int], int]]:
    """(prompt + llama.cpp's greedy answer with `adapter`, prompt length) per prompt, as token ids."""
    from ownlm.engine import GenerationParams

    out = []
    for text in PROMPTS:
        q = [{"role": "user", "content": text}]
        prompt = llama.encode_chat(q)
        answer = llama.stream(q, GenerationParams(max_tokens=ANSWER_TOKENS, temperature=0), adapter=adapter).text()
        out.append((prompt + llama.tokenizer.encode(answer, add_special_tokens=False)[:ANSWER_TOKENS], len(prompt)))
    return out


def figures(llama, adapter, model, sequences) -> dict:
    """Top-1 agreement and mean / max |d log p| of the teacher token, over every answer position."""
    agree = n = 0
    deltas = []
    for ids, start in sequences:
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # (len, vocab)
        got = llama.next_token_logprobs(ids, range(start, len(ids)), TOP_K, adapter=adapter)
        for t, top in zip(range(start, len(ids)), got):
            agree += max(top, key=top.get) == int(ref[t - 1].argmax())
            n += 1
            if ids[t] in top:  # the teacher token outside llama.cpp's top-k (a re-tokenized answer): counted apart
                deltas.append(abs(top[ids[t]] - float(ref[t - 1, ids[t]])))
    return {"agreement": agree / n, "positions": n, "mean_dlogp": sum(deltas) / len(deltas), "max_dlogp": max(deltas),
            "teacher_outside_top": n - len(deltas)}


@pytest.mark.slow
def test_llama_with_adapter_agrees_with_torch_with_delta(real, tmp_path, monkeypatch):
    from ownlm.bitdelta import gguf_lora
    from ownlm.engine import GenerationParams
    from ownlm.engine.llama import LlamaEngine

    adapter = gguf_lora.write_gguf_lora(real["delta"], real["gguf"], tmp_path / "user.gguf")
    llama = LlamaEngine(real["gguf"], real["tok"], "smollm2", adapters={"user": adapter}, threads=1)
    base_model, personal_model = torch_model(real, False), torch_model(real, True)
    personal_seqs = teacher_sequences(llama, "user")

    personal = figures(llama, "user", personal_model, personal_seqs)
    base = figures(llama, None, base_model, teacher_sequences(llama, None))
    crossed = figures(llama, None, personal_model, personal_seqs)  # llama.cpp's base against torch's personal model
    monkeypatch.setattr(gguf_lora, "rope_permute_rows", lambda rows, n_head: rows)  # trap 1: q/k rows left in HF order
    unpermuted_path = gguf_lora.write_gguf_lora(real["delta"], real["gguf"], tmp_path / "unpermuted.gguf")
    unpermuted = figures(LlamaEngine(real["gguf"], real["tok"], "x", adapters={"u": unpermuted_path}, threads=1), "u",
                         personal_model, personal_seqs)
    print(f"\nparity over {personal['positions']} teacher-forced positions ({len(PROMPTS)} prompts x {ANSWER_TOKENS}):")
    for label, f in (("personal (llama.cpp + adapter vs torch + delta)", personal),
                     ("base (llama.cpp vs torch)", base), ("llama.cpp base vs torch personal", crossed),
                     ("adapter without the q/k row permutation", unpermuted)):
        print(f"  {label}: top-1 agreement {f['agreement']:.1%}, mean |d log p| {f['mean_dlogp']:.4f}, "
              f"max {f['max_dlogp']:.3f}, teacher outside top-{TOP_K}: {f['teacher_outside_top']}")
    # Seen on 2 cores: personal 96.7% / 0.049 (max 0.24); base 97.5% / 0.039 (max 0.29): most of the difference is
    # llama.cpp's Q4_1 x Q8 arithmetic, which the base has too. Crossed 80.8% / 0.44; unpermuted 87.5% / 0.22.
    assert personal["agreement"] >= 0.95 and personal["mean_dlogp"] < 0.1
    assert base["agreement"] >= 0.95 and base["mean_dlogp"] < 0.1
    assert crossed["agreement"] < 0.9  # the delta changes the model: agreeing with it is the adapter's doing
    assert unpermuted["mean_dlogp"] > 2.5 * personal["mean_dlogp"]

    # scale 0 (the base of an engine that holds the adapter) is the base exactly
    bare = LlamaEngine(real["gguf"], real["tok"], "smollm2", threads=1)
    ids, start = personal_seqs[0]
    positions = range(start, len(ids))
    assert llama.next_token_logprobs(ids, positions, TOP_K) == bare.next_token_logprobs(ids, positions, TOP_K)
    q = [{"role": "user", "content": PROMPTS[1]}]
    greedy = GenerationParams(max_tokens=24, temperature=0)
    assert llama.stream(q, greedy).text() == bare.stream(q, greedy).text()
    assert llama.stream(q, greedy, adapter="user").text() != bare.stream(q, greedy).text()
