"""The evaluation report: every number for the base, the personal model and its compressed delta, as JSON
and as table rows. A metric that was not computed is None (JSON null, "—" in the table).

    report = EvalReport(base=ModelScores(heldout_nll=2.9), personal=ModelScores(heldout_nll=2.4, kl_drift=0.05))
    report.personalization_score          # 0.172...
    json.dumps(report.to_dict())          # derived scores included
    columns, rows = report.to_table()     # rich: Table(*columns); for r in rows: table.add_row(*r)

Definitions of the metrics: see `ownlm.evaluate.metrics`. Filling one from a base and a delta, one model in memory:

    base = load_base(settings); m, tok = base.model, base.tokenizer
    b = ModelScores(heldout_nll=assistant_nll(m, heldout).mean_nll, arc_easy=multiple_choice_accuracy(
        m, tok, mc_items("arc_easy")))
    with delta_applied(m, delta, base.sha256):
        p = ModelScores(heldout_nll=assistant_nll(m, heldout).mean_nll, ...)
    p.kl_drift = kl_drift(m, delta, dolly_examples(tok), base_sha256=base.sha256)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

from ownlm.evaluate.metrics import kept_gain, perplexity_ratio, personalization_score


@dataclass
class ModelScores:
    """One model variant's numbers; None = not measured."""

    heldout_nll: float | None = None  # nats per held-out assistant token (evaluate.assistant_nll)
    heldout_perplexity: float | None = None  # exp(heldout_nll)
    kl_drift: float | None = None  # KL(base || this model), nats per position on Dolly prompts; None for the base
    wikitext_perplexity: float | None = None  # per token (general.general_perplexity)
    arc_easy: float | None = None  # accuracy 0..1 (log-likelihood, acc_norm by characters)
    piqa: float | None = None  # accuracy 0..1
    hellaswag: float | None = None  # accuracy 0..1
    lambada: float | None = None  # last-word greedy accuracy 0..1
    behaviour: float | None = None  # share of persona probes passed 0..1 (evaluate.behaviour_score)
    behaviour_fact: float | None = None  # same, fact probes only
    behaviour_style: float | None = None  # same, style probes only
    tokens_per_s: float | None = None  # greedy generation speed (evaluate.speed)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{f.name}={v!r} must be a finite number or None")


# (field, label, format) in table order; format takes a float and returns text.
_PCT = "{:.1%}".format
ROWS: list[tuple[str, str, object]] = [
    ("heldout_nll", "held-out assistant NLL (nats/token)", "{:.4f}".format),
    ("heldout_perplexity", "held-out assistant perplexity", "{:.2f}".format),
    ("kl_drift", "KL drift from base (nats/position)", "{:.4f}".format),
    ("wikitext_perplexity", "WikiText-2 perplexity (per token)", "{:.2f}".format),
    ("arc_easy", "ARC-Easy accuracy", _PCT),
    ("piqa", "PIQA accuracy", _PCT),
    ("hellaswag", "HellaSwag accuracy", _PCT),
    ("lambada", "LAMBADA last-word accuracy", _PCT),
    ("behaviour", "persona probes passed", _PCT),
    ("behaviour_fact", "  fact probes passed", _PCT),
    ("behaviour_style", "  style probes passed", _PCT),
    ("tokens_per_s", "speed (tokens/s)", "{:.1f}".format),
]
COLUMNS = ["metric", "base", "personal", "compressed"]


@dataclass
class EvalReport:
    """Base, personal and compressed scores, and what they were measured on.

    heldout_tokens: target tokens in the held-out set; items: benchmark name -> items scored; notes: free
    text worth keeping with the numbers (device, base sha256, delta id, MC normalisation...).
    """

    base: ModelScores = field(default_factory=ModelScores)
    personal: ModelScores | None = None
    compressed: ModelScores | None = None
    heldout_tokens: int | None = None
    items: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def _nll(self, which: str) -> float | None:
        scores = getattr(self, which)
        return None if scores is None else scores.heldout_nll

    def score(self, which: str = "personal") -> float | None:
        """Personalization score of 'personal' or 'compressed' (see evaluate's module doc)."""
        base, other = self._nll("base"), self._nll(which)
        return None if base is None or other is None else personalization_score(base, other)

    def ratio(self, which: str = "personal") -> float | None:
        """Perplexity ratio PPL_which / PPL_base."""
        base, other = self._nll("base"), self._nll(which)
        return None if base is None or other is None else perplexity_ratio(base, other)

    @property
    def personalization_score(self) -> float | None:
        return self.score("personal")

    @property
    def perplexity_ratio(self) -> float | None:
        return self.ratio("personal")

    @property
    def kept_gain(self) -> float | None:
        """Share of the personal model's NLL gain kept by the compressed delta; None if not computable."""
        nlls = [self._nll(w) for w in ("base", "personal", "compressed")]
        return None if None in nlls else kept_gain(*nlls)

    def to_dict(self) -> dict:
        """JSON-ready: the measured scores plus the derived ones under "derived"."""
        d = asdict(self)
        d["derived"] = {
            "personalization_score": self.score("personal"),
            "perplexity_ratio": self.ratio("personal"),
            "compressed_personalization_score": self.score("compressed"),
            "compressed_perplexity_ratio": self.ratio("compressed"),
            "kept_gain": self.kept_gain,
        }
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> EvalReport:
        """Inverse of to_dict (the derived block is recomputed, not read)."""
        def scores(x):
            return None if x is None else ModelScores(**x)

        return cls(ModelScores(**d["base"]), scores(d.get("personal")), scores(d.get("compressed")),
                   d.get("heldout_tokens"), dict(d.get("items", {})), dict(d.get("notes", {})))

    def to_table(self) -> tuple[list[str], list[list[str]]]:
        """(column names, rows of text): one row per metric measured for some variant, then the derived
        scores. Empty cells are "—"."""
        variants = [self.base, self.personal, self.compressed]

        def cell(value, fmt) -> str:
            return "—" if value is None else fmt(value)

        rows = []
        for name, label, fmt in ROWS:
            values = [None if v is None else getattr(v, name) for v in variants]
            if any(x is not None for x in values):
                rows.append([label] + [cell(x, fmt) for x in values])
        derived = [
            ("personalization score (NLL gain / base NLL)", [None, self.score("personal"), self.score("compressed")],
             _PCT),
            ("perplexity ratio (vs base)", [None, self.ratio("personal"), self.ratio("compressed")], "{:.3f}".format),
            ("kept gain (compressed / personal)", [None, None, self.kept_gain], _PCT),
        ]
        for label, values, fmt in derived:
            if any(x is not None for x in values):
                rows.append([label] + [cell(x, fmt) for x in values])
        return list(COLUMNS), rows
