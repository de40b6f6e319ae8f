"""Redaction of secrets and personal data before text becomes training data or a memory passage.

It lives in the store stage (below learn) because the store's memory index (store/memory.py) keeps only
redacted text, the same redaction the dataset applies (learn/dataset.py).

Patterns are deliberately specific (prefixes of real key formats, Luhn-checked card numbers) so ordinary text
is left alone. Each hit becomes a placeholder such as `[EMAIL]`, and the caller gets counts per kind.
"""

from __future__ import annotations

import re
from collections import Counter

# Order matters: keys before the generic long-token rule, cards before phone numbers.
PATTERNS: list[tuple[str, re.Pattern]] = [
    ("PRIVATE_KEY", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)),
    ("API_KEY", re.compile(
        r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}"
        r"|xox[abposr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,}|olm_[A-Za-z0-9_-]{40,})"
    )),
    ("SECRET", re.compile(r"(?i)\b(?:api[_-]?key|secret|token|password|passwd)\b(\s*[:=]\s*)(['\"]?)[^\s'\"]{8,}\2")),
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
    ("CARD", re.compile(r"\b(?:\d[ -]?){12,18}\d\b")),
    ("PHONE", re.compile(r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4}(?![\w.])")),
]


def _luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def redact(text: str) -> tuple[str, Counter]:
    """Replace secrets and PII in `text`; returns the new text and a Counter of kinds replaced."""
    counts: Counter = Counter()
    for kind, pattern in PATTERNS:
        def sub(m: re.Match, kind=kind) -> str:
            if kind == "CARD" and not _luhn_ok(re.sub(r"\D", "", m.group(0))):
                return m.group(0)  # a long number that is not a card number (an id, a date run...)
            counts[kind] += 1
            if kind == "SECRET":  # keep the key name, drop the value
                return m.group(0)[: m.start(1) - m.start(0)] + m.group(1) + "[SECRET]"
            return f"[{kind}]"

        text = pattern.sub(sub, text)
    return text, counts
