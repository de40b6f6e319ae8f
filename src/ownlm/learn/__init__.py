"""Learn: a user's stored conversations become a trained adapter.

dataset (conversations → examples, redacted by store.redact, and the held-out split; merkle gives the audit root) → tokens
(chat-templated ids and loss masks) → batching (length-grouped batches under a token budget) → train (LoRA with
peft; the step maths in steps) — and continual (which examples a round trains on and what adapter it starts
from). worker runs train in a process of its own.
"""
