"""The micro LLM world: both dialects parse, the checker rejects what it must, the text sets."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from dallm.micro_llm import world
from dallm.micro_llm.data import text_sets, write_text_sets


def test_every_generated_text_parses_in_its_own_dialect_only() -> None:
    base = world.corpus(300, "base", 0)
    teacher = world.corpus(100, "teacher", 0)
    assert world.grammatical_rate(base, "base") == 1.0
    assert world.grammatical_rate(teacher, "teacher") == 1.0
    assert world.grammatical_rate(base, "teacher") == 0.0
    assert world.grammatical_rate(teacher, "base") == 0.0
    assert len(set(base)) > 250  # a varied corpus, not a few repeated texts


def test_parse_reads_back_the_scene() -> None:
    rng = random.Random(0)
    for _ in range(50):
        scene = world.sample_scene(rng)
        want = {"shape": scene.shape, "fg": scene.fg, "bg": scene.bg, "size": scene.size, "pos": scene.pos}
        assert world.parse(world.describe(scene, "teacher", rng), "teacher") == want
        assert world.parse(world.describe(scene, "base", rng), "base") == want


@pytest.mark.parametrize(
    "text",
    [
        "a small red circle on a blue background. it is on the left. the background is green.",  # bg twice
        "a small red circle on a blue background. it is on the left. it is small.",  # size twice, same value
        "a small red circle on a red background. it is on the left.",  # fg equals bg
        "there is a red circle on the left. the background is red. it is small.",  # fg equals bg, later
        "a small red circle on a blue background.",  # no position
        "a red small circle on a blue background. it is on the left.",  # word order
        "a small red circle on a blue background. it is on the left",  # no final full stop
        "it is on the left. a small red circle on a blue background.",  # a detail cannot open a text
        "",
        "a small red circle on a blue background. [UNK].",
    ],
)
def test_parse_rejects_ungrammatical_or_inconsistent_text(text: str) -> None:
    assert world.parse(text, "base") is None


def test_parse_accepts_decoded_token_spacing_and_case() -> None:
    got = world.parse("A small red circle on a blue background . it is on the left .", "base")
    assert got == {"size": "small", "fg": "red", "shape": "circle", "bg": "blue", "pos": "left"}
    t = "behold , upon a field of blue doth rest a circle of red ; small it is , and on the left it lies ."
    assert world.parse(t, "teacher") is not None
    assert world.parse(t.replace("of red", "of blue"), "teacher") is None


def test_unknown_dialect_and_impossible_scenes_are_refused() -> None:
    with pytest.raises(ValueError, match="dialect 'poetic'"):
        world.parse("a", "poetic")
    with pytest.raises(ValueError, match="colours must differ"):
        world.TextScene("circle", "red", "red", "small", "left")
    with pytest.raises(ValueError, match="only 900 distinct scenes"):
        world.split_scenes(900, 1, 0)


def test_lexicon_covers_both_dialects() -> None:
    words = set(world.LEXICON)
    for text in world.corpus(200, "base", 1) + world.corpus(50, "teacher", 1):
        assert set(world._tokens(text).split(" ")) <= words
    assert {"behold", "doth", "upon"} <= words


def test_text_sets_are_disjoint_seeded_and_written(tmp_path: Path) -> None:
    sets = text_sets(n_train=40, n_val=30, n_base=20, seed=4)
    assert sets == text_sets(n_train=40, n_val=30, n_base=20, seed=4)
    assert len(sets.train) == 40 and len(sets.validation) == 30 and len(sets.base) == 20
    assert not set(sets.train) & set(sets.validation)
    assert world.grammatical_rate(sets.train + sets.validation, "teacher") == 1.0
    assert world.grammatical_rate(sets.base, "base") == 1.0
    paths = write_text_sets(tmp_path / "jsonl", sets)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert [r["text"] for r in rows] == sets.train
    paths = write_text_sets(tmp_path / "txt", sets, fmt="txt")
    assert paths["validation"].read_text().splitlines() == sets.validation
    with pytest.raises(ValueError, match="format 'csv'"):
        write_text_sets(tmp_path, sets, fmt="csv")
    with pytest.raises(ValueError, match="n_val 0"):
        text_sets(n_val=0)


def test_entropy_by_hand() -> None:
    # 3 shapes x 6 x 5 colours x 2 sizes x 5 positions; base: 4 openers, two of which leave two
    # details to say in either order
    assert world.N_SCENES == 900
    assert world.entropy_nats("teacher") == pytest.approx(math.log(900))
    assert world.entropy_nats("base") == pytest.approx(math.log(900) + math.log(4) + math.log(2) / 2)
    # every choice gives a different text: a large corpus has (almost) as many texts as it can
    texts = world.corpus(20000, "base", 3)
    assert len(set(texts)) > 0.85 * (1 - math.exp(-20000 / math.exp(world.entropy_nats("base")))) * math.exp(
        world.entropy_nats("base")
    )
