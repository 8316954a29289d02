"""Tests for align.judges: strict checkers for verifiable instructions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from align.judges import (
    INSTRUCTION_TYPES,
    check,
    describe,
    ifeval_reward,
    judge,
    parse_constraints,
    score,
)

# type -> [(params, response, expected)]; every type needs a True and a False case.
CASES: dict[str, list[tuple[dict, str, bool]]] = {
    "lowercase": [
        ({}, "all lowercase here, 123 and punctuation!", True),
        ({}, "almost all lowercase but one Word", False),
        ({}, "", True),
    ],
    "uppercase": [
        ({}, "ALL CAPS, WITH DIGITS 42.", True),
        ({}, "ALL CAPS EXCEPT one", False),
        ({}, "1234 !!!", False),  # needs at least one letter
    ],
    "max_words": [
        ({"n": 3}, "one two three", True),
        ({"n": 3}, "  one\ntwo   three  ", True),
        ({"n": 3}, "one two three four", False),
    ],
    "min_words": [
        ({"n": 3}, "one two three", True),
        ({"n": 3}, "one two", False),
    ],
    "include_keyword": [
        ({"keyword": "pollen"}, "Bees carry POLLEN home.", True),
        ({"keyword": "pollen"}, "Bees help pollenate flowers.", False),  # not a whole word
        ({"keyword": "pollen"}, "Bees make honey.", False),
        ({"keyword": "ice cream"}, "I like Ice Cream a lot.", True),
    ],
    "forbidden_word": [
        ({"word": "honey"}, "Bees make nectar into a sweet syrup.", True),
        ({"word": "honey"}, "Bees make Honey.", False),
        ({"word": "honey"}, "A honeycomb is made of wax.", True),  # whole words only
    ],
    "json_object": [
        ({"key": "answer"}, '{"answer": "yes"}', True),
        ({"key": "answer"}, '  ```json\n{"answer": 1, "x": 2}\n```  ', True),
        ({"key": "answer"}, '```\n{"answer": 1}\n```', True),
        ({"key": "answer"}, '{"response": "yes"}', False),
        ({"key": "answer"}, 'Here it is: {"answer": "yes"}', False),
        ({"key": "answer"}, '["answer"]', False),
        ({"key": "answer"}, "answer: yes", False),
    ],
    "bullet_points": [
        ({"n": 2}, "Intro\n- one\n  * two\nOutro", True),
        ({"n": 2}, "- one\n- two\n- three", False),
        ({"n": 2}, "1. one\n2. two", False),  # numbered lists are not bullets
        ({"n": 2}, "- one\n-two\n**bold**", False),
    ],
    "end_with": [
        ({"phrase": "Hope this helps."}, "Some text. Hope this helps.\n", True),
        ({"phrase": "Hope this helps."}, "Some text. Hope this helps. Bye!", False),
        ({"phrase": "Hope this helps."}, "Some text. hope this helps.", False),
        ({"phrase": "Hope this helps."}, "Some text. Hope this helps", False),
    ],
    "no_commas": [
        ({}, "No commas here. None at all.", True),
        ({}, "One comma, right here.", False),
    ],
    "start_with": [
        ({"word": "Indeed"}, "Indeed, bees make honey.", True),
        ({"word": "indeed"}, '  "INDEED bees make honey."', True),
        ({"word": "Indeed"}, "Actually, bees make honey.", False),
        ({"word": "Indeed"}, "Indeedy bees make honey.", False),
        ({"word": "Indeed"}, "", False),
    ],
    "num_sentences": [
        ({"n": 3}, "One. Two! Three?", True),
        ({"n": 2}, "Version 1.5 is out. It works...", True),  # no split inside 1.5
        ({"n": 2}, "One. Two. Three.", False),
        ({"n": 1}, "No terminal punctuation at all", True),
    ],
    "num_paragraphs": [
        ({"n": 2}, "First para.\nStill first.\n\nSecond para.", True),
        ({"n": 2}, "First.\n  \n\n\nSecond.\n", True),
        ({"n": 2}, "First.\nSecond on a single newline.", False),
        ({"n": 2}, "A.\n\nB.\n\nC.", False),
    ],
    "title": [
        ({}, "<<The Water Cycle>>\nWater moves around.", True),
        ({}, "The Water Cycle\nWater moves around.", False),
        ({}, "<<   >>\nEmpty title.", False),
    ],
}

ALL_CASES = [(kind, *case) for kind, cases in CASES.items() for case in cases]


def test_every_type_has_passing_and_failing_cases():
    assert set(CASES) == set(INSTRUCTION_TYPES), "add test cases for every instruction type"
    for kind, cases in CASES.items():
        outcomes = {expected for _, _, expected in cases}
        assert outcomes == {True, False}, f"{kind} needs both a compliant and a violating case"


def test_at_least_the_required_types():
    required = {
        "lowercase",
        "uppercase",
        "max_words",
        "min_words",
        "include_keyword",
        "json_object",
        "bullet_points",
        "end_with",
        "no_commas",
        "start_with",
        "num_sentences",
        "num_paragraphs",
    }
    assert required <= set(INSTRUCTION_TYPES)


@pytest.mark.parametrize(("kind", "params", "response", "expected"), ALL_CASES)
def test_check(kind, params, response, expected):
    assert check({"type": kind, **params}, response) is expected


@pytest.mark.parametrize("kind", sorted(INSTRUCTION_TYPES))
def test_describe_every_type(kind):
    params = CASES[kind][0][0]
    text = describe({"type": kind, **params})
    assert isinstance(text, str) and text.strip() and text == text.strip()
    for value in params.values():
        assert str(value) in text


def test_describe_example():
    assert describe({"type": "lowercase"}).startswith("Your entire response must be in lowercase letters.")
    assert describe('{"type": "max_words", "n": 40}') == "Answer with at most 40 words."


def test_unknown_type_raises():
    with pytest.raises(ValueError, match="no_such_type") as err:
        check({"type": "no_such_type"}, "x")
    assert "lowercase" in str(err.value)  # lists the known types
    with pytest.raises(ValueError, match="no_such_type"):
        judge([{"type": "no_such_type"}], "x")
    with pytest.raises(ValueError, match="no_such_type"):
        describe({"type": "no_such_type"})


def test_bad_constraints_raise_value_error():
    with pytest.raises(ValueError):
        check({"n": 3}, "x")  # no type
    with pytest.raises(ValueError, match="max_words"):
        check({"type": "max_words"}, "x")  # missing parameter
    with pytest.raises(ValueError, match="max_words"):
        describe({"type": "max_words"})


MULTI = [
    {"type": "lowercase"},
    {"type": "max_words", "n": 12},
    {"type": "include_keyword", "keyword": "nectar"},
    {"type": "no_commas"},
]


def test_judge_and_score_multi():
    good = "bees turn nectar into honey inside the hive."
    assert judge(MULTI, good) is True
    assert score(MULTI, good) == 1.0
    one_bad = "Bees turn nectar into honey inside the hive."
    assert judge(MULTI, one_bad) is False
    assert score(MULTI, one_bad) == pytest.approx(0.75)
    two_bad = "Bees, as everyone knows, turn flower sugar into honey."
    assert score(MULTI, two_bad) == pytest.approx(0.25)
    assert judge([], "anything") is True
    assert score([], "anything") == 1.0


def test_json_string_constraints():
    encoded = json.dumps(MULTI)
    good = "bees turn nectar into honey inside the hive."
    assert judge(encoded, good) is True
    assert score(encoded, "Bees turn nectar into honey.") == pytest.approx(0.75)
    assert check(json.dumps({"type": "no_commas"}), "a, b") is False
    assert parse_constraints([json.dumps(c) for c in MULTI]) == MULTI
    assert parse_constraints({"type": "lowercase"}) == [{"type": "lowercase"}]


def test_none_params_are_ignored():
    # older `datasets` load heterogeneous dicts as structs padded with None
    padded = {"type": "lowercase", "n": None, "keyword": None, "key": None}
    assert check(padded, "all lower") is True
    assert describe(padded).startswith("Your entire response must be in lowercase")
    assert judge([{"type": "max_words", "n": 2, "keyword": None}], "one two three") is False


def test_ifeval_reward_string_completions():
    prompts = ["p1", "p2", "p3"]
    completions = [
        "bees turn nectar into honey inside the hive.",
        "Bees turn nectar into honey.",
        "NO",
    ]
    constraints = [MULTI, json.dumps(MULTI), [{"type": "uppercase"}]]
    rewards = ifeval_reward(prompts, completions, constraints=constraints, trainer_state=None)
    assert rewards == pytest.approx([1.0, 0.75, 1.0])
    assert all(isinstance(r, float) for r in rewards)


def test_ifeval_reward_message_completions():
    prompts = [[{"role": "user", "content": "p"}]] * 2
    completions = [
        [{"role": "assistant", "content": '```json\n{"answer": "ok"}\n```'}],
        [
            {"role": "assistant", "content": '{"answer": "draft"}'},
            {"role": "assistant", "content": "plain text"},
        ],
    ]
    constraints = [json.dumps([{"type": "json_object", "key": "answer"}])] * 2
    assert ifeval_reward(prompts, completions, constraints) == [1.0, 0.0]


def test_an_empty_answer_earns_no_reward_though_it_passes_negative_constraints():
    negative = [{"type": "lowercase"}, {"type": "no_commas"}, {"type": "max_words", "n": 50}]
    assert judge(negative, "") is True  # IFEval's verdict, which evaluation keeps
    assert score(negative, "") == 1.0
    assert ifeval_reward(["p"] * 3, ["", "  \n", "fine"], constraints=[negative] * 3) == [0.0, 0.0, 1.0]
    assert ifeval_reward(["p"], [[{"role": "assistant", "content": " "}]], [negative]) == [0.0]


def test_ifeval_reward_needs_constraints():
    with pytest.raises(ValueError, match="constraints"):
        ifeval_reward(["p"], ["c"])
    with pytest.raises(ValueError):
        ifeval_reward(["p", "q"], ["c", "d"], constraints=[[]])


def test_import_is_light():
    code = "import sys, align.judges; assert 'torch' not in sys.modules; print('ok')"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "ok"
