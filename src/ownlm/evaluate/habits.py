"""A user's habitual reply shape, learned from their own data, and whether a model's replies show it.

    found = habits(train_replies)          # [Habit(kind="opening", text="Ahoy!", share=1.0), ...]
    rate = habit_rate(found[0], answers)   # share of `answers` that show it, 0..1

The quality gate's behaviour check (where the user's data allows one): a personal model should answer
*held-out* prompts the way the person's assistant replies habitually look — a fixed opening ("Ahoy!"),
a fixed closing ("— ok"), a final question mark — more often than the base does. Only habits that most of
the user's target replies share count (`min_share`); a user without one gets no behaviour check. Pure
functions: no model, no I/O.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

MIN_SHARE = 0.6  # a habit must appear in at least this share of the user's replies
MAX_WORDS = 3  # longest opening/closing phrase considered, in words
MIN_REPLIES = 10  # fewer target replies than this: too little evidence for a habit


@dataclass(frozen=True)
class Habit:
    """kind: 'opening' (reply starts with text), 'closing' (ends with text) or 'final' (last character).
    text: the phrase or character; share: the share of the user's replies that have it (0..1)."""

    kind: Literal["opening", "closing", "final"]
    text: str
    share: float

    def shown_by(self, reply: str) -> bool:
        r = reply.strip()
        # a closing phrase and a final character are both checked at the end of the reply
        return r.startswith(self.text) if self.kind == "opening" else r.endswith(self.text)

    def describe(self) -> str:
        where = {"opening": "starts with", "closing": "ends with", "final": "ends with the character"}[self.kind]
        return f"{where} {self.text!r} ({self.share:.0%} of the user's replies)"


def _best_phrase(replies: list[list[str]], from_end: bool, min_share: float) -> tuple[str, float] | None:
    """The longest (up to MAX_WORDS) word sequence at the start (or end) shared by >= min_share of replies."""
    best = None
    for n in range(1, MAX_WORDS + 1):
        counts = Counter(" ".join(w[-n:] if from_end else w[:n]) for w in replies if len(w) >= n)
        if not counts:
            break
        phrase, k = counts.most_common(1)[0]
        share = k / len(replies)
        if share < min_share:
            break
        best = (phrase, share)
    return best


def habits(replies: list[str], min_share: float = MIN_SHARE) -> list[Habit]:
    """The habits shared by at least `min_share` of `replies` (the user's target assistant replies).

    An opening or closing phrase needs a letter in it (a bare "1." or "-" is a list shape, not a phrase; the
    'final' habit covers punctuation such as a closing '?'). A final '.' is not a habit: nearly every model
    reply ends with one.
    """
    texts = [r.strip() for r in replies if r and r.strip()]
    if len(texts) < MIN_REPLIES:
        return []
    words = [t.split() for t in texts]
    out = []
    for kind, from_end in (("opening", False), ("closing", True)):
        found = _best_phrase(words, from_end, min_share)
        if found and any(c.isalpha() for c in found[0]):
            out.append(Habit(kind, found[0], round(found[1], 4)))
    last, k = Counter(t[-1] for t in texts).most_common(1)[0]
    if k / len(texts) >= min_share and not last.isalnum() and last != "." and not any(
            h.kind == "closing" and h.text.endswith(last) for h in out):
        out.append(Habit("final", last, round(k / len(texts), 4)))
    return out


def degenerate(answer: str, repeats: int = 4, max_n: int = 3) -> bool:
    """Does `answer` loop: some run of 1..max_n words repeated back to back `repeats` times or more?

    "Ahoy! Ahoy! Ahoy! Ahoy!" is a degenerate answer that a style check for an opening "Ahoy!" would pass; a
    person sees a broken model. Words are compared case-insensitively without surrounding punctuation."""
    words = [w.strip(".,;:!?\"'()[]").lower() for w in answer.split()]
    words = [w for w in words if w]
    for n in range(1, max_n + 1):
        for start in range(0, len(words) - n * repeats + 1):
            gram = words[start:start + n]
            if all(words[start + k * n:start + (k + 1) * n] == gram for k in range(1, repeats)):
                return True
    return False


def habit_rate(habit: Habit, answers: list[str], finished: list[bool] | None = None) -> float | None:
    """Share of `answers` (0..1) that show `habit`; 0.0 for no answers.

    finished: per answer, whether it ended by itself (not cut at the token budget). An answer that was cut has
    no ending, so for a closing or final habit only finished answers count; None when none finished (the habit
    cannot be judged from these answers)."""
    if finished is not None and habit.kind != "opening":
        answers = [a for a, done in zip(answers, finished) if done]
        if not answers:
            return None
    return sum(habit.shown_by(a) for a in answers) / len(answers) if answers else 0.0
