"""LoRA training speed: the usual peft + transformers loop against ownlm.learn.train.train, same data, same process.

Both train LoRA r=8, alpha=16 on q_proj/v_proj of the base for one epoch over the same tokenized conversations
(every assistant reply a target), AdamW at the same learning rate, fp32 on the CPU.

(a) baseline, as it is usually written: shuffled batches of 8 conversations padded to the longest with an
    attention mask, `model(input_ids, attention_mask, labels)` (full logits at every position, loss masked to
    the assistant tokens by labels=-100), clip, AdamW step.
(b) ownlm: length-grouped batches under a token budget, right padding without a mask, the LM head only at
    target positions, batches collated once (ownlm.learn.train.train, checkpoint and adapter writes included).

tokens/s counts the dataset's tokens (the same number for both) over each epoch's wall time. The machine may
be shared: with --repeats N the two loops alternate N times and the medians are printed, and the CPU seconds
this process used are printed too (less sensitive to other processes than wall time; the speedup is given
for both).

    python bench/train_speed.py [--home DIR] [--data FILE] [--conversations 100] [--repeats 1]

Measured 2026-11-25 on the shared 2-core AMD EPYC (AVX2, no AVX512-BF16), another engineer's job holding one
core, so with OWNLM_THREADS=1: 100 conversations, 8,416 tokens: baseline 108.9 s (77.3 tokens/s), ownlm 63.3 s
(132.9 tokens/s, 9 steps, 3.9 % padding), speedup 1.72x (same in CPU seconds). With 2 threads under that load
the runs were dominated by thread thrashing (baseline 135-158 s, ownlm 84-129 s).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.capture.importers import parse_file  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.learn.tokens import IGNORE, TokenizedExample, tokenize_chat  # noqa: E402
from ownlm.learn.train import TrainConfig, train  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/fixtures/exports/sharegpt/fastchat-dummy-conversation.json"


def load_examples(tokenizer, path: Path, n: int) -> list[TokenizedExample]:
    result = parse_file(path)
    out = []
    for conv in result.conversations[:n]:
        msgs = [{"role": m.role, "content": m.content, "target": m.role == "assistant"} for m in conv.messages]
        ids, labels = tokenize_chat(tokenizer, msgs)
        out.append(TokenizedExample(ids, labels, conv.external_id or ""))
    return out


def baseline_epoch(base, examples: list[TokenizedExample], config: TrainConfig, batch_size: int = 8) -> float:
    """The common peft + transformers loop; returns the epoch's wall seconds."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base.model, lora)
    try:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        pad = base.tokenizer.pad_token_id
        order = list(range(len(examples)))
        random.Random(config.seed).shuffle(order)
        t0 = time.perf_counter()
        for i in range(0, len(order), batch_size):
            rows = [examples[j] for j in order[i : i + batch_size]]
            rows = [(r.input_ids[-config.max_seq_len :], r.labels[-config.max_seq_len :]) for r in rows]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((len(rows), width), pad)
            labels = torch.full((len(rows), width), IGNORE)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for k, (x, y) in enumerate(rows):
                ids[k, : len(x)], labels[k, : len(y)], mask[k, : len(x)] = torch.tensor(x), torch.tensor(y), 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            opt.zero_grad()
        return time.perf_counter() - t0
    finally:
        model.unload()
        base.model.eval()


def ownlm_epoch(base, examples: list[TokenizedExample], config: TrainConfig) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        report = train(base, examples, [], config, Path(out), resume=False)
        return time.perf_counter() - t0, {"steps": report.steps, "padding": report.padding_fraction,
                                          "loss_tokens": report.loss_tokens}


def warm_up(base, examples: list[TokenizedExample]) -> None:
    """One untimed forward + backward, so first-call allocations and kernel selection hit neither side."""
    ids = torch.tensor([examples[0].input_ids[:64]])
    base.model.get_input_embeddings().weight.requires_grad_(False)
    x = base.model.get_input_embeddings()(ids).requires_grad_(True)
    base.model(inputs_embeds=x).logits.float().mean().backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=None, help="ownlm home holding the base cache (default: $OWNLM_HOME)")
    ap.add_argument("--base", default="embedded")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="chat export parsed with ownlm's importers")
    ap.add_argument("--conversations", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two loops N times; print medians")
    ap.add_argument("--batch-tokens", type=int, default=TrainConfig.batch_tokens)
    ap.add_argument("--only", choices=["baseline", "ownlm"], help="run one side only")
    args = ap.parse_args()

    settings = load_settings(home=args.home, base=args.base, device="cpu")
    base = load_base(settings)
    examples = load_examples(base.tokenizer, args.data, args.conversations)
    tokens = sum(len(e) for e in examples)
    config = TrainConfig(epochs=1, batch_tokens=args.batch_tokens, warmup_ratio=0.0, checkpoint_every_steps=10_000)
    print(f"base {base.source.name} ({base.n_params:,} params), {torch.get_num_threads()} threads, "
          f"cpu count {os.cpu_count()}, torch {torch.__version__}")
    print(f"data: {len(examples)} conversations, {tokens} tokens, "
          f"{sum(e.n_loss_tokens for e in examples)} assistant tokens; LoRA r={config.r} alpha={config.alpha} "
          f"on {','.join(config.target_modules)}; ownlm batch_tokens={config.batch_tokens}")
    warm_up(base, examples)
    times: dict[str, list[float]] = {"baseline": [], "ownlm": []}
    cpu_times: dict[str, list[float]] = {"baseline": [], "ownlm": []}
    for rep in range(args.repeats):
        sides = ["baseline", "ownlm"] if rep % 2 == 0 else ["ownlm", "baseline"]  # alternate who goes first
        for side in sides:
            if args.only and side != args.only:
                continue
            c0 = time.process_time()
            if side == "baseline":
                t = baseline_epoch(base, examples, config)
                extra = f"({-(-len(examples) // 8)} steps of 8)"
            else:
                t, info = ownlm_epoch(base, examples, config)
                extra = f"({info['steps']} steps, padding {info['padding']:.1%})"
            cpu = time.process_time() - c0
            times[side].append(t)
            cpu_times[side].append(cpu)
            print(f"  run {rep + 1} {side + ':':9s} {t:7.1f} s  {tokens / t:7.1f} tokens/s  cpu {cpu:7.1f} s  {extra}",
                  flush=True)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items() if v}
    for k, t in med.items():
        print(f"{k:9s} tokens/s: {tokens / t:7.1f}   wall: {t:7.1f} s   cpu: {cpu_med[k]:7.1f} s   "
              f"(median of {len(times[k])})")
    if len(med) == 2:
        print(f"speedup: {med['baseline'] / med['ownlm']:.2f}x   (in CPU seconds: {cpu_med['baseline'] / cpu_med['ownlm']:.2f}x)")


if __name__ == "__main__":
    main()
