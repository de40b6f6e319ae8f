"""Rule-based paraphrases of one user turn: the same question asked another way, for knowledge augmentation.

A fact only generalises to unseen questions when the model saw it asked in varied phrasings (Physics of
Language Models 3.1), so `paraphrases(text, k, seed)` rewrites a user's question k ways and the dataset keeps
the reply. The rules touch only the edges and the function words of a turn (openers, polite wrappers,
contractions, the question/imperative frame, case, final punctuation); the words that carry the meaning are
copied verbatim, so they work on any user's real text. What a user pasted is never rewritten: code, URLs,
markup, several lines or more than `MAX_WORDS` words get no variants. Text that is not mostly English gets
only the language-neutral rules (final punctuation, first-letter case).

Pure and deterministic: every choice comes from sha256 of (seed, text, counter), never from global random
state, so the same input gives the same variants on every machine and Python version.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace

MAX_WORDS = 60  # a longer turn is usually a paste or a document: left alone
RULES = ("opener", "polite", "contraction", "reform", "case", "punctuation")  # rule families, in apply order

# ------------------------------------------------------------------ what is never rewritten

_CODE = re.compile(
    r"`|https?://|www\.|\b[\w-]+\.(?:com|org|net|io|dev|ai|py|js|ts|json|sh|txt|md|cpp|rs|go|java|html|css|ya?ml|toml)\b"
    r"|[{}<>\\|=^~]|;\s*$|\$[A-Za-z({]|\w\(|::|->|=>|&&|\b\w+_\w+\b|\b[a-z]+[A-Z]\w*|\w/\w+/",
    re.M,
)
_ENGLISH = frozenset(
    "i me my you your we our what how where who which why when is are am do does did can could would should "
    "will the a an to of in on for and or it this that with about tell give please thanks thank hi hey hello "
    "any some not no have has be there help make need want get got know remember remind".split()
)


def untouchable(text: str) -> str | None:
    """Why a turn must not be paraphrased ("code", "multiline", "long", "empty"), or None when it may be."""
    if not text.strip():
        return "empty"
    if "\n" in text.strip():
        return "multiline"  # several lines: a paste (a log, a list, a snippet), not a question to rephrase
    if len(text.split()) > MAX_WORDS:
        return "long"
    if _CODE.search(text):
        return "code"
    return None


def is_english(text: str) -> bool:
    """Mostly ASCII letters and at least one common English word: the English rules may apply."""
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) / len(letters) < 0.95:
        return False
    return any(w in _ENGLISH for w in re.findall(r"[a-z]+", text.lower()))


# ------------------------------------------------------------------ deterministic choices


class _Rng:
    """Choices from sha256(seed:counter): stable everywhere, no global state."""

    def __init__(self, seed: str) -> None:
        self.seed, self.n = seed, 0

    def below(self, n: int) -> int:
        self.n += 1
        return int.from_bytes(hashlib.sha256(f"{self.seed}:{self.n}".encode()).digest()[:8], "big") % n

    def choice(self, options: list):
        return options[self.below(len(options))]

    def sample(self, options: list, k: int) -> list:
        pool, out = list(options), []
        for _ in range(min(k, len(pool))):
            out.append(pool.pop(self.below(len(pool))))
        return out


# ------------------------------------------------------------------ a turn taken apart


@dataclass
class _Parts:
    openers: list[str] = field(default_factory=list)  # stripped lead-ins, verbatim ("Before I forget: ")
    core: str = ""  # the question itself, first known word lower-cased, no final punctuation
    inner: str = ""  # trailer before the final punctuation (", please")
    punct: str = ""  # final punctuation ("?", ".", "" ...)
    outer: str = ""  # trailer after it (" thanks!", " asking for myself.")
    cap: bool = False  # first letter of the whole turn upper-case
    mood: str = "stmt"  # "q" | "imp" | "stmt"

    def text(self) -> str:
        # a trailer after no final mark needs a comma: "what about forests, thanks!"
        join = "," if self.outer and not self.punct else ""
        s = ("".join(self.openers) + self.core.rstrip() + self.inner + self.punct + join + self.outer).strip()
        return _cap(s) if self.cap else s


_WH = r"(?:what|which|whose|how much|how many)(?: \w+)?|where|who|when|why|how(?: long| often| far| old)?"
_AUX = "is are am was were do does did can could would should will shall have has may might".split()
_VERBS = ("tell give explain show write help make plan suggest name say describe list run add find turn create "
          "build recommend teach remind check fix translate summarize summarise compare draft recap analyze analyse "
          "generate convert implement calculate rewrite edit review design debug solve answer use put keep try "
          "draw sketch outline brainstorm").split()
_LEADS = frozenset(["what", "which", "whose", "where", "who", "when", "why", "how", "please", "any", "got", "remind",
                    "so", "also", "hey", "hi", "hello", "btw", "quick", "one", "the", "a", "an", "this", "that",
                    "these", "those", "it", "there", "my", "your", "we", "you", "they", "and", "but", "or", "on", "in",
                    "at", "for", "with", "if", "after", "before", "because", "since"]
                   + _AUX + _VERBS)
_GREET = r"hey|hi|hello|hiya|yo|morning|good morning|evening|long day|before i forget|by the way"
_FILLER = (r"ok,? and|oh,? and|and also|ok,? so|okay,? so|thanks\.? next|quick question|quick one|one more thing|"
           r"different question|another question|i was wondering|alright|right|okay|ok|so|well|um|uh|btw|also|next")
# A lead-in is stripped only when punctuation follows it ("Long day. ", never the "well-" of "well-known"), or
# when a question or request starts right after it ("so how do I ...").
_ASKS = "|".join(["what", "how", "where", "who", "which", "why", "when", "any", "got", "remind"] + _AUX + _VERBS)
_OPENER = re.compile(rf"^(?:(?:{_GREET}|{_FILLER})\s*[,.:!;\u2014]+\s*|(?:{_GREET}|{_FILLER})\s+(?=(?:{_ASKS})\b))", re.I)
_OUTER = re.compile(r"^(.*?[?.!])\s+(thanks[.!]*|thank you[.!]*|thx[.!]*|cheers[.!]*|asking for myself[.!]*|"
                    r"asking for a friend[.!]*)$", re.I)
_INNER = re.compile(r"^(.*?\w.*?),?\s+(please|pls|thanks|thank you)\s*([?.!]*)$", re.I)
_ADD_OPENERS = {"q": ["hey, ", "quick question: ", "so ", "btw, ", "also, ", "one more thing: ", "I was wondering, "],
                "imp": ["hey, ", "so ", "quick one: ", "also, ", "one more thing: ", "btw, "],
                "stmt": ["hey, ", "so ", "btw, ", "well, "]}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _first_word(s: str) -> str:
    m = re.match(r"[\w'’]+", s)
    return m.group(0) if m else ""


def _known_lead(s: str) -> bool:
    return re.split(r"['’]", _first_word(s).lower())[0] in _LEADS


def _lower_lead(s: str) -> str:
    """Lower-case the first word when it is a function word (What's → what's); a name (Paris), "I" and an
    acronym keep their case."""
    first = _first_word(s)
    if not _known_lead(s) or first.isupper() or re.match(r"I\b", first):
        return s
    return s[:1].lower() + s[1:]


def _mood(core: str, punct: str) -> str:
    first = _first_word(core).lower()
    if "?" in punct or re.match(rf"(?:{_WH})\b", core, re.I) or first in _AUX or first in ("any", "got"):
        return "q"
    return "imp" if first in _VERBS or first == "please" else "stmt"


def parse(text: str, english: bool = True) -> _Parts:
    """A turn taken apart. Not `english`: only the final punctuation comes off, nothing else is touched."""
    s = text.strip()
    p = _Parts(cap=s[:1].isupper())
    if not english:
        m = re.search(r"[?.!…？。！]+$", s)
        p.core, p.punct = (s[: m.start()], m.group(0)) if m else (s, "")
        p.mood = "q" if re.search(r"[?？]", p.punct) else "stmt"
        return p
    for _ in range(4):  # "thanks. next: quick question: how ..." holds several
        m = _OPENER.match(s)
        if not m or not s[m.end():].strip():
            break
        p.openers.append(m.group(0))
        s = s[m.end():]
    if (m := _OUTER.match(s)) and re.search(r"\w", m.group(1)):
        s, p.outer = m.group(1), " " + m.group(2)
    m = re.search(r"[?.!…]+$", s)
    if m:
        s, p.punct = s[: m.start()], m.group(0)
    if (m := _INNER.match(s)) and len(m.group(1).split()) >= 2:
        s, p.inner, p.punct = m.group(1), ", " + m.group(2), m.group(3) or p.punct
    if p.openers and (m := re.match(r"(?:and|but)\s+", s, re.I)):  # "ok, and what ..." keeps "and" with "ok, "
        p.openers[-1] += s[: m.end()]
        s = s[m.end():]
    p.core = _lower_lead(s.strip())
    p.mood = "stmt" if _social(p.core) else _mood(p.core, p.punct)
    return p


# small talk carries no fact to rephrase: only case, punctuation and contractions touch it
_SOCIAL = re.compile(r"^(?:thanks|thank you|thx|cheers|ok|okay|great|perfect|cool|nice|hi|hello|hey|bye|goodbye|"
                     r"good night|have a nice day|see you)\b", re.I)


def _social(core: str) -> bool:
    return bool(_SOCIAL.match(core)) and len(core.split()) <= 4


_CONJ = re.compile(r"^(?:and|but|or|so|because)\b", re.I)


# ------------------------------------------------------------------ clause frames: direct ↔ embedded

_DET = r"(?:my|your|the|a|an|our|his|her|their|this|that)"
_NP = rf"{_DET}\b[\w'’ -]*?"
_NOT_NP_END = re.compile(r"(?:ed|ing)$|^(?:called|named|like|up|in|on|at|for|to|about|from|with|doing)$")
_SUBJ = r"I|you|we|they"
_MODAL = r"can|should|could|would|will"


def _np_ok(np: str) -> bool:
    words = np.split()
    return len(words) >= 2 and "," not in np and not _NOT_NP_END.search(words[-1].lower())


def embedded(q: str) -> str | None:
    """Direct question → embedded clause: "what's my job" → "what my job is"; None when unsure."""
    again = ""
    if m := re.match(r"^(.*?)\s+again$", q, re.I):
        q, again = m.group(1), " again"
    if (m := re.match(rf"^({_WH})\s*(?:\s(is|are)|['’]s)\s+({_NP})$", q, re.I)) and _np_ok(m.group(3)):
        return f"{m.group(1)} {m.group(3)} {m.group(2) or 'is'}{again}"
    if m := re.match(rf"^({_WH})\s+do\s+({_SUBJ})\s+(.+)$", q, re.I):
        return f"{m.group(1)} {m.group(2)} {m.group(3)}{again}"
    if m := re.match(rf"^({_WH})\s+(am|are)\s+({_SUBJ})\s+(.+)$", q, re.I):
        return f"{m.group(1)} {m.group(3)} {m.group(2)} {m.group(4)}{again}"
    if m := re.match(rf"^({_WH})\s+({_MODAL})\s+({_SUBJ})\s+(.+)$", q, re.I):
        return f"{m.group(1)} {m.group(3)} {m.group(2)} {m.group(4)}{again}"
    return None


def direct(e: str) -> str | None:
    """Embedded clause → direct question: "where I live" → "where do I live"; None when unsure."""
    again = ""
    if m := re.match(r"^(.*?)\s+again$", e, re.I):
        e, again = m.group(1), " again"
    if (m := re.match(rf"^({_WH})\s+({_NP})\s+(is|are)$", e, re.I)) and _np_ok(m.group(2)):
        return f"{m.group(1)} {m.group(3)} {m.group(2)}{again}"
    if m := re.match(rf"^({_WH})\s+(?:(I)\s+am|(I)['’]m|(you|we|they)\s+are|(you|we|they)['’]re)\s+(.+)$", e, re.I):
        subj = next(g for g in m.groups()[1:5] if g)
        return f"{m.group(1)} {'am' if subj == 'I' else 'are'} {subj} {m.group(6)}{again}"
    if m := re.match(rf"^({_WH})\s+({_SUBJ})\s+({_MODAL})\s+(.+)$", e, re.I):
        return f"{m.group(1)} {m.group(3)} {m.group(2)} {m.group(4)}{again}"
    if (m := re.match(rf"^({_WH})\s+({_SUBJ})\s+(\w+)\b(.*)$", e, re.I)) and m.group(3).lower() not in _AUX + ["'m"]:
        return f"{m.group(1)} do {m.group(2)} {m.group(3)}{m.group(4)}{again}"
    return None


# ------------------------------------------------------------------ rule families: each returns options


def _reform(p: _Parts) -> list[tuple[str, str]]:
    """Question ↔ imperative reframes of the core: [(new core, new mood)]."""
    c, out = p.core, []
    if m := re.match(r"^remind me[,:]?\s+(?:of\s+)?(.+)$", c, re.I):
        rest = m.group(1)
        d = direct(rest) or (rest if re.match(rf"(?:{_WH})\b", rest, re.I) and embedded(rest) else None)
        e = embedded(rest) or (rest if direct(rest) else None)
        if d:
            out.append((d, "q"))
        if e:
            out += [(f"do you remember {e}", "q"), (f"can you tell me {e}", "q")]
        if re.match(rf"^{_NP}$", rest, re.I) and _np_ok(rest):  # remind me of my diet
            out += [(f"what is {rest}", "q"), (f"do you remember {rest}", "q")]
    elif m := re.match(r"^(?:do you (?:remember|know)|can you tell me|could you tell me)\s+(.+)$", c, re.I):
        rest = m.group(1)
        if d := direct(rest):
            out += [(d, "q"), (f"remind me {rest}", "imp")]
        elif re.match(rf"^{_NP}$", rest, re.I) and _np_ok(rest):  # do you remember my cat's name
            out += [(f"what is {rest}", "q"), (f"remind me of {rest}", "imp")]
    elif m := re.match(r"^how (?:do|can|should) I\s+(.+)$", c, re.I):
        verb = re.match(r"^how (do|can|should) I", c, re.I).group(1).lower()
        out += [(f"what's the best way to {m.group(1)}", "q")]
        out += [(f"how {v} I {m.group(1)}", "q") for v in ("do", "should", "can") if v != verb]
    elif m := re.match(r"^what(?:'s| is) the best way to\s+(.+)$", c, re.I):
        out += [(f"how do I {m.group(1)}", "q"), (f"how should I {m.group(1)}", "q")]
    elif m := re.match(r"^how to\s+(.+)$", c, re.I):
        out += [(f"how do I {m.group(1)}", "q"), (f"what's the best way to {m.group(1)}", "q")]
    elif m := re.match(r"^tell me about\s+(.+)$", c, re.I):
        out += [(f"what do you know about {m.group(1)}", "q"), (f"what can you tell me about {m.group(1)}", "q")]
    elif m := re.match(r"^what (?:do you know|can you tell me) about\s+(.+)$", c, re.I):
        out += [(f"tell me about {m.group(1)}", "imp")]
    elif m := re.match(r"^(?:got any|any) (?:advice|tips) (?:on|for|about)\s+(.+)$", c, re.I):
        out += [(f"what's your take on {m.group(1)}", "q"), (f"any tips for {m.group(1)}", "q")]
    elif m := re.match(r"^what(?:'s| is) your take on\s+(.+)$", c, re.I):
        out += [(f"got any advice on {m.group(1)}", "q"), (f"any tips for {m.group(1)}", "q")]
    elif m := re.match(r"^(?:can|could|would) you (?:please\s+)?(\w+)\b(.*)$", c, re.I):
        if m.group(1).lower() in _VERBS and m.group(1).lower() != "tell":
            out.append((m.group(1) + m.group(2), "imp"))
    elif p.mood == "imp" and _first_word(c).lower() in _VERBS and not c.lower().startswith("remind"):
        out += [(f"can you {c}", "q"), (f"could you {c}", "q")]
    elif (e := embedded(c)) is not None:
        out += [(f"remind me {e}", "imp"), (f"do you remember {e}", "q")]
        if (m := re.match(r"^what(?:'s| is)\s+(my\b.+?)(?:\s+again)?$", c, re.I)) and _np_ok(m.group(1)):
            out.append((f"do you remember {m.group(1)}", "q"))  # what is my X → do you remember my X
    return [(core, mood) for core, mood in out if core.lower() != c.lower()]


def _polite(p: _Parts) -> list[_Parts]:
    """Add, remove or swap a polite wrapper: "could you tell me ...", ", please", "thanks!"."""
    out = []
    if p.inner or p.outer:
        out.append(replace(p, inner="", outer=""))
    if m := re.match(r"^(?:can|could|would) you (?:please )?tell me\s+(.+)$", p.core, re.I):
        if d := direct(m.group(1)):
            out.append(replace(p, core=d, mood="q"))
    elif m := re.match(r"^please\s+(.+)$", p.core, re.I):
        out.append(replace(p, core=m.group(1)))
    elif p.mood == "q" and (e := embedded(p.core)):
        out.append(replace(p, core=f"could you tell me {e}"))
    elif p.mood == "imp":
        out += [replace(p, core=f"could you {p.core}", mood="q"), replace(p, core=f"please {p.core}")]
    if not p.inner and not p.outer:
        out.append(replace(p, outer=" thanks!"))
        if p.mood == "imp" or re.match(r"(?:can|could|would) you\b", p.core, re.I):  # a request, not "is it ...?"
            out.append(replace(p, inner=", please"))
    else:
        out.append(replace(p, inner="", outer=" thanks!" if "thank" not in (p.inner + p.outer).lower() else " cheers!"))
    return out


_CONTRACT = [("what", "is", "s"), ("where", "is", "s"), ("who", "is", "s"), ("how", "is", "s"), ("that", "is", "s"),
             ("it", "is", "s"), ("there", "is", "s"), ("I", "am", "m"), ("you", "are", "re"), ("we", "are", "re"),
             ("they", "are", "re"), ("do", "not", "n't"), ("does", "not", "n't"), ("did", "not", "n't"),
             ("is", "not", "n't"), ("are", "not", "n't"), ("was", "not", "n't"), ("should", "not", "n't"),
             ("could", "not", "n't"), ("would", "not", "n't"), ("have", "not", "n't"), ("has", "not", "n't"),
             ("I", "will", "ll"), ("you", "will", "ll")]
_IRREGULAR = {"can't": "cannot", "won't": "will not"}
_EXPAND_ONLY = {"i've": "I have", "you've": "you have", "we've": "we have", "they've": "they have", "i'd": "I would"}
_PERFECT = re.compile(r"^(?:been|got|gone|done|had|\w+ed)$", re.I)  # "what's happened" is "what has": not "is"


def _case_as(src: str, new: str) -> str:
    return new[:1].upper() + new[1:] if src[:1].isupper() and new[:1] != "I" else new


def _expand(s: str) -> str:
    def one(m: re.Match) -> str:
        word = m.group(0)
        nxt = re.match(r"\s+(\w+)", m.string[m.end():])
        perfect = bool(nxt and _PERFECT.match(nxt.group(1)))  # "what's happened", "I'd been": not is / would
        key = word.lower().replace("’", "'")
        if key in _IRREGULAR:
            return _case_as(word, _IRREGULAR[key])
        if key in _EXPAND_ONLY:
            return word if perfect else _case_as(word, _EXPAND_ONLY[key])
        for a, b, suffix in _CONTRACT:
            if key == a.lower() + ("" if suffix == "n't" else "'") + suffix:
                if suffix == "s" and perfect:
                    return word
                return _case_as(word, f"{a if a == 'I' else word[: len(a)]} {b}")
        return word  # a possessive ("my cat's") or a contraction without a safe expansion ("let's")

    return re.sub(r"\b[A-Za-z]+(?:['’](?:s|m|re|ll|ve|d)|n['’]t)\b", one, s)


_BE_NEXT = (r"(?:a|an|the|my|your|his|her|our|their|this|that|these|those|it|not|going|so|very|really|just|still|"
            r"also|too|always|never|here|there|up|on|in|at|from|for|about|over|ready|sure|fine|ok|okay|\d+|\w+ing|"
            r"\w+ed)\b")


def _contract(s: str) -> str:
    apo = "’" if "’" in s else "'"
    s2 = re.sub(r"\b(can)not\b", lambda m: m.group(1) + "n" + apo + "t", s, flags=re.I)
    for a, b, suffix in _CONTRACT:
        joined = (apo + suffix) if suffix != "n't" else ("n" + apo + "t")
        # never where the verb ends a clause: "I know what it is (and ...)" has no "what it's"; a form of "be"
        # contracts only before a word that starts what follows it ("what is my ...", "it is not ...")
        after = _BE_NEXT if b in ("is", "am", "are") else r"\w"
        s2 = re.sub(rf"\b({a})\s+{b}\b(?=\s+(?:{after}))", lambda m, j=joined: m.group(1) + j, s2, flags=re.I)
    return s2


def _contraction(p: _Parts) -> list[_Parts]:
    out = []
    if (e := _expand(p.core)) != p.core:
        out.append(replace(p, core=e))
    if (c := _contract(p.core)) != p.core:
        out.append(replace(p, core=c))
    return out


def _opener(p: _Parts, english: bool) -> list[_Parts]:
    if not english:
        return []
    out = [replace(p, openers=[])] if p.openers else []
    if len(p.openers) > 1:
        out.append(replace(p, openers=p.openers[-1:]))
    if _CONJ.match(p.core):  # "and if that fails?" already has its connector
        return out
    own = {o.strip().lower() for o in p.openers}
    out += [replace(p, openers=[o]) for o in _ADD_OPENERS[p.mood] if o.strip().lower() not in own]
    return out


def _case(p: _Parts) -> list[_Parts]:
    first = _first_word("".join(p.openers) + p.core)
    if not first or not first[0].isalpha() or first[0].lower() == first[0].upper():
        return []  # a script without case (Chinese, Japanese ...)
    if not p.cap:
        return [replace(p, cap=True)]
    # lower-case only a function word: "Paris", "I" and "NASA" stay as they are
    lowerable = (p.openers or _known_lead(p.core)) and not re.match(r"I\b", first) and not first.isupper()
    return [replace(p, cap=False)] if lowerable else []


def _punctuation(p: _Parts) -> list[_Parts]:
    options = ["?", ""] if p.mood == "q" else [".", "", "!"]
    if re.search(r"[？。！]", p.punct):  # full-width marks: the half-width one is a variant too
        options = ["？", "?", ""] if p.mood == "q" else ["。", ".", ""]
    return [replace(p, punct=x) for x in options if x != p.punct]


# ------------------------------------------------------------------ variants


def paraphrases(text: str, k: int, seed: str = "") -> list[str]:
    """Up to k rewrites of `text`, each through at least two rule families (one where only one applies,
    e.g. punctuation of a language without case), distinct from `text` and from each other. [] when the text
    is untouchable (see `untouchable`) or admits no rule."""
    return [v for v, _ in rewrites(text, k, seed)]


def rewrites(text: str, k: int, seed: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """`paraphrases` with the rule families that made each variant: [(variant, families)]."""
    if k <= 0 or untouchable(text):
        return []
    english = is_english(text)
    base = parse(text, english)
    families = [f for f in RULES if _options(f, base, english)]
    rng = _Rng(f"{seed}:{text}")
    seen = {" ".join(text.split())}
    out: list[tuple[str, tuple[str, ...]]] = []
    for _ in range(12 * k if families else 0):  # bounded: a text that admits few rules yields fewer than k
        if len(out) >= k:
            break
        wanted = rng.sample(families, min(len(families), 2 + rng.below(2)))
        if "reform" in families and "reform" not in wanted and rng.below(4):
            wanted.append("reform")  # the reframes vary a question most: favour them
        p, applied = base, []
        for fam in RULES:  # fixed order: reframe before wrapping, wrap before case and punctuation
            if fam not in wanted:
                continue
            options = _options(fam, p, english)
            if options:
                p = rng.choice(options)
                applied.append(fam)
        variant = p.text()
        if len(applied) < min(2, len(families)) or not variant or " ".join(variant.split()) in seen:
            continue
        seen.add(" ".join(variant.split()))
        out.append((variant, tuple(applied)))
    return out


def _options(family: str, p: _Parts, english: bool) -> list[_Parts]:
    """The family's rewrites of `p`; a rewrite that changes the mood gets that mood's final mark."""
    return [o if o.mood == p.mood else replace(o, punct=_mood_punct(p, o.mood)) for o in _family(family, p, english)]


def _family(family: str, p: _Parts, english: bool) -> list[_Parts]:
    if _social(p.core) and family not in ("case", "punctuation", "contraction"):
        return []
    if p.mood == "stmt" and family == "polite" and not (p.inner or p.outer):
        return []  # "I fell off my bike today, thanks!" thanks for nothing
    if family == "reform":
        return [replace(p, core=c, mood=m) for c, m in _reform(p)] if english else []
    if family == "polite":
        return _polite(p) if english else []
    if family == "contraction":
        return _contraction(p) if english else []
    if family == "opener":
        return _opener(p, english)
    if family == "case":
        return _case(p)
    return _punctuation(p)


def _mood_punct(p: _Parts, mood: str) -> str:
    """Final punctuation after a reframe: the new mood's mark, or none when the user wrote none."""
    if mood == p.mood or not p.punct:
        return p.punct
    return "?" if mood == "q" else "."
