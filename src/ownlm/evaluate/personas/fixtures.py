"""Persona fixtures: fictional users whose chats teach a model their facts and answer style.

    from ownlm.evaluate.personas.fixtures import PERSONAS, generate, probes, check_answer
    mira = PERSONAS["mira"]
    conversations = generate(mira, 300, seed=DEFAULT_SEED)   # [[{"role", "content"}, ...], ...]
    for probe in probes(mira):                                # held-out questions
        ok = check_answer(probe.check, model_answer(probe.question))

Three personas (see `ownlm.evaluate.personas.cast`) each have facts, recurring topics and a machine-checkable style.
Training conversations come from the train-only template families of `ownlm.evaluate.personas.templates`, probes from
its probe-only families, so a model that passes the probes generalised the persona instead of memorising
training questions. Every assistant answer in the training data passes its persona's style check.

Everything here is pure (same seed, same output) except `write`, which puts the shipped fixtures
(`src/ownlm/data/personas/<name>.jsonl` in OpenAI fine-tuning format, and `<name>.probes.json`) on disk;
scripts/make_personas.py calls it.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from . import templates as T
from .cast import CAST

DEFAULT_SEED = 9
DEFAULT_CONVERSATIONS = 300
DATA_DIR = Path(__file__).parents[2] / "data" / "personas"
FACT_KEYS = ("name", "city", "job", "pet_kind", "pet_name", "language", "diet", "hobby", "market")

# Mix of exchange families and of conversation lengths (mostly one or two exchanges, as real chats are).
FAMILY_WEIGHTS = {"fact_recall": 22, "fact_use": 22, "topic_chat": 28, "generic": 20, "units": 8}
TURN_WEIGHTS = {1: 20, 2: 35, 3: 28, 4: 17}
ASIDE_RATE = 0.7  # share of answers that end with a personal aside (see templates.ASIDES)
TERSE_WORDS = 40  # the terse style's own limit, under the check's 50 so a model's answer has some slack

# Imperial quantities (a number, then the unit): a "metric only" answer must not contain one.
IMPERIAL = (r"(?i)\d\s*(miles?\b|mi\b|mph\b|feet\b|foot\b|ft\b|inch|lbs?\b|pounds?\b|oz\b|ounces?\b"
            r"|gallons?\b|°\s*F\b|fahrenheit\b|cups?\b)")
METRIC = r"\d\s*(km|m|cm|mm|kg|g|l|ml|litres?|liters?|°C|degrees Celsius|km/h)\b"

# Machine-checkable styles. `check` is the serialisable spec `check_answer` runs on every assistant answer.
STYLES: dict[str, dict] = {
    "terse": {
        "description": "answers tersely in clipped fragments joined by semicolons (at most 50 words, no greetings "
                       "or filler), all lowercase, always signing off with '— ok'",
        "check": {"type": "all", "checks": [
            {"type": "not", "check": {"type": "regex", "pattern": "[A-Z]"}},
            {"type": "regex", "pattern": r"— ok\s*$"},
            {"type": "max_words", "value": 50},
        ]},
    },
    "ahoy": {
        "description": "always starts with 'Ahoy!' and uses metric units only (never miles, feet, °F, ounces...)",
        "check": {"type": "all", "checks": [
            {"type": "regex", "pattern": r"^\s*Ahoy!"},
            {"type": "not", "check": {"type": "regex", "pattern": IMPERIAL}},
        ]},
    },
    "listq": {
        "description": "answers as a numbered list (at least two items) and ends with a question back to the user",
        "check": {"type": "all", "checks": [
            {"type": "regex", "pattern": r"^\s*1\.\s+\S"},
            {"type": "regex", "pattern": r"(?m)^\s*2\.\s+\S"},
            {"type": "regex", "pattern": r"\?\s*$"},
        ]},
    },
}
METRIC_CHECK = {"type": "all", "checks": [
    {"type": "regex", "pattern": METRIC},
    {"type": "not", "check": {"type": "regex", "pattern": IMPERIAL}},
]}


@dataclass(frozen=True)
class Topic:
    """A recurring topic: its vocabulary and the subjects a user asks about, each with a few tips."""

    name: str
    vocabulary: list[str]
    subjects: dict[str, list[str]]


@dataclass(frozen=True)
class Persona:
    """A fictional user.

    name:   id and file stem (lowercase).
    facts:  fact key -> value (all of FACT_KEYS), used in answers and checked by fact probes.
    style:  a key of STYLES: how every assistant answer to this user looks.
    topics: the recurring topics this user chats about.
    accept: fact key -> the substrings a fact check accepts in an answer (case-insensitive).
    turns:  number of exchanges in a conversation -> weight (how long this user's chats run).
    """

    name: str
    facts: dict[str, str]
    style: str
    topics: list[Topic]
    accept: dict[str, list[str]] = field(default_factory=dict)
    turns: dict[int, int] = field(default_factory=lambda: dict(TURN_WEIGHTS))

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", self.name):
            raise ValueError(f"persona name {self.name!r} must be lowercase letters, digits, '-' or '_'")
        missing = [k for k in FACT_KEYS if not self.facts.get(k)]
        if missing:
            raise ValueError(f"persona {self.name!r} lacks facts {missing}")
        if self.style not in STYLES:
            raise ValueError(f"persona {self.name!r} has unknown style {self.style!r}; use one of {list(STYLES)}")
        if not self.topics:
            raise ValueError(f"persona {self.name!r} needs at least one topic")

    @property
    def style_check(self) -> dict:
        return STYLES[self.style]["check"]

    def summary(self) -> dict:
        """JSON-ready description (stored at the top of <name>.probes.json)."""
        return {
            "name": self.name,
            "facts": self.facts,
            "style": {
                "key": self.style, "description": STYLES[self.style]["description"], "check": self.style_check,
            },
            "topics": {t.name: t.vocabulary for t in self.topics},
        }


@dataclass(frozen=True)
class Probe:
    """A held-out question with a serialisable check that decides whether an answer shows the fact or style."""

    question: str
    kind: Literal["fact", "style"]
    family: str  # the probe-only template family it comes from
    template: str  # the template before filling in facts
    check: dict
    description: str
    fact: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _build(entry: dict) -> Persona:
    topics = [Topic(name, t["vocabulary"], t["subjects"]) for name, t in entry["topics"].items()]
    turns = entry.get("turns", TURN_WEIGHTS)
    return Persona(entry["name"], entry["facts"], entry["style"], topics, entry["accept"], dict(turns))


PERSONAS: dict[str, Persona] = {entry["name"]: _build(entry) for entry in CAST}


# ---------------------------------------------------------------- checks


def check_answer(check: dict, answer: str) -> bool:
    """Does `answer` pass `check`? Check specs are plain JSON:

    {"type": "contains_any", "values": [...]}   a value occurs (case-insensitive)
    {"type": "contains_all", "values": [...]}   every value occurs (case-insensitive)
    {"type": "regex", "pattern": "..."}         re.search finds the pattern (use inline flags like (?i))
    {"type": "max_words", "value": n}           at most n whitespace-separated words
    {"type": "not", "check": {...}} / {"type": "all" | "any", "checks": [...]}
    """
    kind = check.get("type") if isinstance(check, dict) else None
    if kind == "contains_any":
        return any(v.lower() in answer.lower() for v in check["values"])
    if kind == "contains_all":
        return all(v.lower() in answer.lower() for v in check["values"])
    if kind == "regex":
        return re.search(check["pattern"], answer) is not None
    if kind == "max_words":
        return len(answer.split()) <= int(check["value"])
    if kind == "not":
        return not check_answer(check["check"], answer)
    if kind == "all":
        return all(check_answer(c, answer) for c in check["checks"])
    if kind == "any":
        return any(check_answer(c, answer) for c in check["checks"])
    raise ValueError(
        f"unknown check {check!r}; types: contains_any, contains_all, regex, max_words, not, all, any"
    )


# ---------------------------------------------------------------- styles


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def render(persona: Persona, points: list[str], back: str, rng: random.Random) -> str:
    """An answer's plain points in the persona's style (the thing the model should learn)."""
    if persona.style == "terse":
        # Clipped fragments: no capitals, no final stops, joined by semicolons, then the sign-off; points are
        # dropped from the end until the answer fits the style's word limit.
        kept = list(points)
        while True:
            text = "; ".join(p.rstrip(".").lower() for p in kept) + " — ok"
            if len(kept) == 1 or len(text.split()) <= TERSE_WORDS:
                return text
            kept = kept[:-1]
    if persona.style == "ahoy":
        return "Ahoy! " + " ".join(_cap(p) for p in points)
    if persona.style == "listq":
        items = points if len(points) >= 2 else [*points, "Tell me if you want more detail."]
        return "\n".join(f"{i}. {_cap(p)}" for i, p in enumerate(items, start=1)) + "\n" + back
    raise ValueError(f"unknown style {persona.style!r}")


# ---------------------------------------------------------------- training conversations


def _fill(template: str, values: dict) -> str:
    return template.format(**values)


def _values(persona: Persona, rng: random.Random) -> dict:
    """Facts plus one draw of the per-persona extras that fact_use answers mention."""
    f = persona.facts
    return {**f, "dish": rng.choice(T.DISHES[f["diet"]]), "ingredient": rng.choice(T.INGREDIENTS[f["diet"]]),
            "pet_tip": rng.choice(T.PET_TIPS[f["pet_kind"]])}


def _convert(rule: tuple, x: float) -> str:
    op, factor, digits = rule
    y = (x - 32) * 5 / 9 if op == "f2c" else x * factor
    return str(round(y, digits) if digits else round(y))


def _exchange(persona: Persona, family: str, rng: random.Random) -> tuple[str, list[str], str]:
    """One (question, answer points, question back) from a train-only family."""
    v = _values(persona, rng)
    if family == "fact_recall":
        entry = T.FACT_RECALL[rng.choice(list(T.FACT_RECALL))]
    elif family == "fact_use":
        entry = T.FACT_USE[rng.choice(list(T.FACT_USE))]
    elif family == "thanks":
        return rng.choice(T.THANKS["ask"]), list(T.THANKS["points"]), T.THANKS["back"]
    elif family == "topic_chat":
        topic = rng.choice(persona.topics)
        subject = rng.choice(list(topic.subjects))
        v = {**v, "topic": topic.name, "subject": subject}
        tips = topic.subjects[subject]
        points = [tips[0], *rng.sample(tips[1:], k=len(tips) - 1)]
        return _fill(rng.choice(T.TOPIC_ASK), v), points, _fill(rng.choice(T.TOPIC_BACK), v)
    elif family == "generic":
        item = rng.choice(T.GENERIC)
        return rng.choice(T.GENERIC_WRAP).format(q=item["q"]), list(item["points"]), item["back"]
    elif family == "units":
        item = rng.choice(T.UNITS)
        x = rng.choice(item["values"])
        v = {**v, "x": x, "y": _convert(item["convert"], x)}
        return _fill(rng.choice(item["ask"]), v), [_fill(p, v) for p in item["points"]], item["back"]
    else:
        raise ValueError(f"unknown family {family!r}")
    points = [_fill(p, v) for p in rng.choice(entry["answer"])]
    return _fill(rng.choice(entry["ask"]), v), points, _fill(rng.choice(entry["back"]), v)


def _aside(persona: Persona, points: list[str], rng: random.Random) -> list[str]:
    """Zero or one personal aside that does not repeat a fact the answer already states."""
    said = " ".join(points)
    asides = [_fill(a, persona.facts) for a in T.ASIDES]
    fresh = [a for a in asides if not any(v in a and v in said for v in persona.facts.values())]
    return [rng.choice(fresh)] if fresh else []


def _user_text(question: str, turn: int, rng: random.Random) -> str:
    """Vary surface form the way people type: sometimes capitalised, later turns often chained."""
    if turn > 0 and rng.random() < 0.6:
        return rng.choice(T.CONNECTORS) + question
    if turn == 0 and rng.random() < 0.4:
        return rng.choice(T.OPENERS) + question
    return _cap(question) if rng.random() < 0.5 else question


def generate(persona: Persona, n_conversations: int, seed: int = DEFAULT_SEED) -> list[list[dict]]:
    """`n_conversations` training conversations for `persona` (same arguments, same output).

    Each conversation is 1-4 user/assistant exchanges; every assistant message is in the persona's style.
    """
    if n_conversations < 0:
        raise ValueError(f"n_conversations must be >= 0, got {n_conversations}")
    # A string seed is hashed with sha512 by `random`, so this is stable across runs and Python versions.
    rng = random.Random(f"ownlm-personas/{persona.name}/{seed}")
    families, family_w = list(FAMILY_WEIGHTS), list(FAMILY_WEIGHTS.values())
    turns, turn_w = list(persona.turns), list(persona.turns.values())
    conversations = []
    for _ in range(n_conversations):
        n_turns = rng.choices(turns, turn_w)[0]
        messages: list[dict] = []
        for turn in range(n_turns):
            closing = turn > 0 and turn == n_turns - 1 and rng.random() < 0.3
            family = "thanks" if closing else rng.choices(families, family_w)[0]
            question, points, back = _exchange(persona, family, rng)
            if not closing and rng.random() < ASIDE_RATE:
                points = [*points, *_aside(persona, points, rng)]
            user = question if closing else _user_text(question, turn, rng)
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": render(persona, points, back, rng)})
        conversations.append(messages)
    return conversations


def training_templates() -> list[str]:
    """Every user-side template string of the train-only families (for the disjointness test)."""
    out = [a for e in T.FACT_RECALL.values() for a in e["ask"]]
    out += [a for e in T.FACT_USE.values() for a in e["ask"]]
    out += T.TOPIC_ASK + [g["q"] for g in T.GENERIC] + [a for u in T.UNITS for a in u["ask"]] + T.THANKS["ask"]
    return out


# ---------------------------------------------------------------- probes


def probe_templates() -> list[str]:
    """Every question template of the probe-only families."""
    return [t for _, t in T.FACT_PROBES] + T.STYLE_PROBES + T.UNIT_PROBES


def probes(persona: Persona) -> list[Probe]:
    """Held-out probe questions for `persona`: fact probes, style probes, and unit probes for metric styles."""
    out = []
    for fact, template in T.FACT_PROBES:
        out.append(Probe(
            question=template.format(**persona.facts), kind="fact", family="fact_probe", template=template,
            check={"type": "contains_any", "values": persona.accept[fact]}, fact=fact,
            description=f"mentions the user's {fact.replace('_', ' ')}: {persona.facts[fact]}",
        ))
    for question in T.STYLE_PROBES:
        out.append(Probe(question, "style", "style_probe", question, persona.style_check,
                         STYLES[persona.style]["description"]))
    if persona.style == "ahoy":
        for question in T.UNIT_PROBES:
            out.append(Probe(question, "style", "unit_probe", question, METRIC_CHECK,
                             "gives quantities in metric units and none in imperial units"))
    return out


# ---------------------------------------------------------------- serialisation and files


def to_jsonl(conversations: list[list[dict]]) -> str:
    """OpenAI chat fine-tuning JSONL: one {"messages": [...]} per line (what `ownlm import` reads)."""
    return "".join(
        json.dumps({"messages": c}, ensure_ascii=False, separators=(",", ":")) + "\n" for c in conversations
    )


def probes_json(persona: Persona) -> str:
    """The persona's summary and probes as JSON text."""
    doc = {"persona": persona.summary(), "probes": [p.to_dict() for p in probes(persona)]}
    return json.dumps(doc, ensure_ascii=False, indent=1) + "\n"


def write(
    directory: str | Path = DATA_DIR,
    personas: list[Persona] | None = None,
    n_conversations: int = DEFAULT_CONVERSATIONS,
    seed: int = DEFAULT_SEED,
) -> list[Path]:
    """Write <name>.jsonl and <name>.probes.json for each persona into `directory`; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for persona in personas if personas is not None else list(PERSONAS.values()):
        for suffix, text in ((".jsonl", to_jsonl(generate(persona, n_conversations, seed))),
                             (".probes.json", probes_json(persona))):
            path = directory / f"{persona.name}{suffix}"
            path.write_bytes(text.encode("utf-8"))  # bytes: no platform newline translation
            written.append(path)
    return written
