"""The micro LLM's world: short descriptions of the micro image world's scenes, in two dialects.

A scene (`TextScene`) has a shape, a foreground and a background colour (different), a size and a
position. The base dialect describes it in two or three plain sentences drawn from a few
templates ("a small red circle on a blue background. it is on the left."), stating each
attribute exactly once. The teacher dialect, which the base model never sees, is archaic and follows
one fixed rhetorical pattern with adjectives after their nouns ("behold, upon a field of blue
doth rest a circle of red; small it is, and on the left it lies."), the stand-in for a larger
model's style. Both dialects share the lexicon (`LEXICON`) except for a handful of archaic words.

`parse` reads a text back into its scene, per dialect, so generated text can be scored for
grammaticality (every sentence follows a template, every attribute stated once, the two colours
different). Pure Python, deterministic for a given `random.Random`.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "white", "black")
SIZES = ("small", "large")
# position name -> its phrase; the phrase is what the sentences say
POSITIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
DIALECTS = ("base", "teacher")
N_SCENES = len(SHAPES) * len(COLOURS) * (len(COLOURS) - 1) * len(SIZES) * len(POSITIONS)


@dataclass(frozen=True)
class TextScene:
    shape: str
    fg: str
    bg: str
    size: str
    pos: str

    def __post_init__(self) -> None:
        if self.fg == self.bg:
            raise ValueError(f"scene colours must differ: fg and bg are both {self.fg!r}")


def sample_scene(rng: random.Random) -> TextScene:
    fg = rng.choice(COLOURS)
    bg = rng.choice([c for c in COLOURS if c != fg])
    return TextScene(rng.choice(SHAPES), fg, bg, rng.choice(SIZES), rng.choice(tuple(POSITIONS)))


# Base templates. The opener names the shape; details state the attributes it left out, in any
# order. Every attribute is stated exactly once (a redundant grammar asks a micro model to copy
# attributes across sentences, which it learns only slowly).
_OPENERS = (
    "a {size} {fg} {shape} on a {bg} background.",
    "there is a {size} {fg} {shape} {where}.",
    "there is a {fg} {shape} {where}.",
    "a {fg} {shape} on a {bg} background.",
)
_DETAILS = (
    "it is {where}.",
    "the background is {bg}.",
    "it is {size}.",
)
ATTRIBUTES = ("shape", "fg", "bg", "size", "pos")
# The teacher's one pattern (a single sentence).
_TEACHER = "behold, upon a field of {bg} doth rest a {shape} of {fg}; {size} it is, and {where} it lies."


def _fill(template: str, s: TextScene) -> str:
    return template.format(shape=s.shape, fg=s.fg, bg=s.bg, size=s.size, where=POSITIONS[s.pos])


def describe(scene: TextScene, dialect: str, rng: random.Random) -> str:
    """One text describing `scene` in `dialect` ("base": 2-3 sentences; "teacher": one)."""
    if dialect == "teacher":
        return _fill(_TEACHER, scene)
    if dialect != "base":
        raise ValueError(f"dialect {dialect!r}: expected one of {DIALECTS}")
    opener = rng.choice(_OPENERS)
    stated = _slots(opener)
    details = [t for t in _DETAILS if not _slots(t) & stated]
    rng.shuffle(details)
    return " ".join(_fill(t, scene) for t in (opener, *details))


def _slots(template: str) -> set[str]:
    return {"pos" if k == "where" else k for k in re.findall(r"\{(\w+)\}", template)}


def corpus(n: int, dialect: str, seed: int) -> list[str]:
    """`n` texts of random scenes in `dialect`, reproducible from `seed`."""
    rng = random.Random(f"{dialect}:{seed}")
    return [describe(sample_scene(rng), dialect, rng) for _ in range(n)]


def split_scenes(n_train: int, n_val: int, seed: int) -> tuple[list[TextScene], list[TextScene]]:
    """Disjoint train and validation scene lists (no validation scene appears in train)."""
    if n_train + n_val > N_SCENES:
        raise ValueError(
            f"{n_train} + {n_val} scenes requested: the world has only {N_SCENES} distinct scenes"
        )
    rng = random.Random(f"split:{seed}")
    seen: set[TextScene] = set()
    out: list[TextScene] = []
    while len(out) < n_train + n_val:
        s = sample_scene(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out[:n_train], out[n_train:]


# ----------------------------------------------------------------------------------------------
# Parsing: template -> regex with named groups restricted to the lexicon.


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in words)


_SLOTS = {
    "shape": _alt(SHAPES),
    "fg": _alt(COLOURS),
    "bg": _alt(COLOURS),
    "size": _alt(SIZES),
    "where": _alt(POSITIONS.values()),
}


def _tokens(text: str) -> str:
    """Lower case, punctuation as separate words, single spaces: the form templates are matched in."""
    return " ".join(re.findall(r"\{\w+\}|[a-z]+|[.,;]", text.lower()))


def _regex(template: str) -> re.Pattern[str]:
    out = []
    for tok in _tokens(template).split(" "):
        m = re.fullmatch(r"\{(\w+)\}", tok)
        out.append(f"(?P<{m.group(1)}>{_SLOTS[m.group(1)]})" if m else re.escape(tok))
    return re.compile(" ".join(out))


_BASE_RES = [_regex(t) for t in (*_OPENERS, *_DETAILS)]
_TEACHER_RE = _regex(_TEACHER)
_WHERE_TO_POS = {v: k for k, v in POSITIONS.items()}


def parse(text: str, dialect: str) -> dict[str, str] | None:
    """The scene a text describes (its five attributes), or None when it is not a grammatical text.

    Grammatical: the text is a sequence of whole sentences of `dialect`'s templates (base: an
    opener, then details; teacher: exactly its one sentence) that states each attribute exactly
    once, with foreground and background different.
    """
    if re.search(r"[^a-z.,;\s]", text.lower()):
        return None
    t = _tokens(text)
    if dialect == "teacher":
        m = _TEACHER_RE.fullmatch(t)
        return _attrs([m.groupdict()]) if m else None
    if dialect != "base":
        raise ValueError(f"dialect {dialect!r}: expected one of {DIALECTS}")
    sentences = [s.strip() for s in re.findall(r"[^.]*\.", t)]
    if not sentences or "".join(sentences).replace(" ", "") != t.replace(" ", ""):
        return None
    found = []
    for i, s in enumerate(sentences):
        pool = _BASE_RES[: len(_OPENERS)] if i == 0 else _BASE_RES[len(_OPENERS) :]
        m = next((r.fullmatch(s) for r in pool if r.fullmatch(s)), None)
        if m is None:
            return None
        found.append(m.groupdict())
    return _attrs(found)


def _attrs(groups: list[dict[str, str]]) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for g in groups:
        for k, v in g.items():
            key, val = ("pos", _WHERE_TO_POS[v]) if k == "where" else (k, v)
            if key in out:
                return None
            out[key] = val
    if set(out) != set(ATTRIBUTES) or out["fg"] == out["bg"]:
        return None
    return out


def entropy_nats(dialect: str) -> float:
    """Entropy of one text of `dialect` in nats: the floor of any model's NLL per text.

    Scenes are uniform over the N_SCENES (sample_scene draws each attribute uniformly, the
    background among the colours other than the foreground); base text adds the uniform choice
    of opener and the uniform order of the details it needs. Distinct choices give distinct texts.
    """
    if dialect == "teacher":
        return math.log(N_SCENES)
    if dialect != "base":
        raise ValueError(f"dialect {dialect!r}: expected one of {DIALECTS}")
    orders = [
        math.log(math.factorial(sum(1 for t in _DETAILS if not _slots(t) & _slots(o)))) for o in _OPENERS
    ]
    return math.log(N_SCENES) + math.log(len(_OPENERS)) + sum(orders) / len(orders)


def grammatical_rate(texts: list[str], dialect: str) -> float:
    """Fraction of texts that `parse` accepts in `dialect` (0.0 for an empty list)."""
    return sum(parse(t, dialect) is not None for t in texts) / len(texts) if texts else 0.0


def lexicon() -> list[str]:
    """Every word and punctuation mark of both dialects, in a fixed order (the tokenizer's vocabulary)."""
    words: list[str] = []
    templates = (*_OPENERS, *_DETAILS, _TEACHER, *POSITIONS.values())
    for text in (*templates, *SHAPES, *COLOURS, *SIZES):
        for w in re.findall(r"[a-z]+|[.,;]", re.sub(r"\{\w+\}", " ", text)):
            if w not in words:
                words.append(w)
    return words


LEXICON: tuple[str, ...] = tuple(lexicon())
