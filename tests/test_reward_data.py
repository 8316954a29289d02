"""Tests for the shipped verifiable-instruction dataset in reward_data/."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from align.judges import INSTRUCTION_TYPES, describe, judge

DATA = Path(__file__).resolve().parents[1] / "reward_data"

MIN_ROWS = {
    "sft_train": 2000,
    "pairs_train": 2000,
    "pairs_test": 300,
    "prompts_train": 1000,
    "prompts_test": 300,
}
TINY = {"tiny_pairs": "pairs_train", "tiny_sft": "sft_train"}
SCHEMA = {
    "sft": {"messages", "constraints", "topic"},
    "pairs": {"prompt", "chosen", "rejected", "constraints", "topic"},
    "prompts": {"id", "prompt", "constraints", "topic"},
}
ALL_FILES = [*MIN_ROWS, *TINY]
# the forgetting check's general data, written by generate_general.py (tests/test_forgetting.py
# checks its content)
GENERAL_FILES = ["general_text", "general_prompts", "general_qa", "general_sft"]


@cache
def rows(name: str) -> tuple[dict, ...]:
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as fh:
        return tuple(json.loads(line) for line in fh)


def kind_of(name: str) -> str:
    return name.removeprefix("tiny_").split("_")[0]


def prompt_text(row: dict) -> str:
    return (row["messages"] if "messages" in row else row["prompt"])[0]["content"]


def check_messages(messages, roles):
    assert isinstance(messages, list) and [m["role"] for m in messages] == roles
    for message in messages:
        assert set(message) == {"role", "content"}
        assert isinstance(message["content"], str) and message["content"].strip()


def test_files_exist_with_documented_counts():
    for name, minimum in MIN_ROWS.items():
        assert (DATA / f"{name}.jsonl").is_file(), name
        assert len(rows(name)) >= minimum, name
    for name in TINY:
        assert len(rows(name)) == 32, name
    assert (DATA / "README.md").is_file()
    assert (DATA / "generate.py").is_file()
    total = sum(p.stat().st_size for p in DATA.iterdir() if p.is_file())
    assert total < 8 * 1024 * 1024


@pytest.mark.parametrize("name", ALL_FILES)
def test_schema(name):
    kind = kind_of(name)
    for row in rows(name):
        assert set(row) == SCHEMA[kind]
        assert isinstance(row["topic"], str) and row["topic"]
        constraints = row["constraints"]
        assert isinstance(constraints, list) and 1 <= len(constraints) <= 2
        for constraint in constraints:
            assert constraint["type"] in INSTRUCTION_TYPES
            # the instruction text really is in the prompt
            assert describe(constraint) in prompt_text(row)
        if kind == "sft":
            check_messages(row["messages"], ["user", "assistant"])
        else:
            check_messages(row["prompt"], ["user"])
        if kind == "pairs":
            check_messages(row["chosen"], ["assistant"])
            check_messages(row["rejected"], ["assistant"])
            assert row["chosen"] != row["rejected"]
        if kind == "prompts":
            assert isinstance(row["id"], str) and row["id"]


@pytest.mark.parametrize("name", ["prompts_train", "prompts_test"])
def test_prompt_ids_unique(name):
    ids = [row["id"] for row in rows(name)]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("name", ALL_FILES)
def test_prompts_unique_within_file(name):
    prompts = [prompt_text(row) for row in rows(name)]
    assert len(prompts) == len(set(prompts))


@pytest.mark.parametrize("name", ["sft_train", "tiny_sft"])
def test_sft_responses_pass(name):
    for row in rows(name):
        assert judge(row["constraints"], row["messages"][-1]["content"]), row


@pytest.mark.parametrize("name", ["pairs_train", "pairs_test", "tiny_pairs"])
def test_chosen_pass_and_rejected_fail(name):
    for row in rows(name):
        assert judge(row["constraints"], row["chosen"][0]["content"]), row
        assert not judge(row["constraints"], row["rejected"][0]["content"]), row


def test_every_type_is_used():
    used = {c["type"] for row in rows("pairs_train") for c in row["constraints"]}
    assert used == set(INSTRUCTION_TYPES)
    used_test = {c["type"] for row in rows("prompts_test") for c in row["constraints"]}
    assert used_test == set(INSTRUCTION_TYPES)


def test_examples_are_short():
    for name in ("sft_train", "pairs_train", "pairs_test"):
        for row in rows(name):
            prompt = prompt_text(row)
            if "messages" in row:
                responses = [row["messages"][-1]["content"]]
            else:
                responses = [row["chosen"][0]["content"], row["rejected"][0]["content"]]
            for response in responses:
                assert len(f"{prompt} {response}".split()) <= 120


def test_train_test_topic_split():
    train_topics = {row["topic"] for name in MIN_ROWS if name.endswith("train") for row in rows(name)}
    test_topics = {row["topic"] for name in MIN_ROWS if name.endswith("test") for row in rows(name)}
    assert len(train_topics) >= 40 and len(test_topics) >= 12
    assert not train_topics & test_topics
    for name in [*TINY, *(n for n in MIN_ROWS if n.endswith("train"))]:
        for row in rows(name):
            assert row["topic"] in train_topics
            text = json.dumps(row).lower()
            for topic in test_topics:
                assert topic.lower() not in text, (name, topic)


def test_tiny_files_are_sampled_from_train():
    for tiny, source in TINY.items():
        source_rows = rows(source)
        for row in rows(tiny):
            assert row in source_rows


def test_generator_is_reproducible(tmp_path):
    """Every shipped file is what a generator beside it writes, byte for byte."""
    for script in ("generate.py", "generate_general.py"):
        cmd = [sys.executable, str(DATA / script), "--out", str(tmp_path)]
        subprocess.run(cmd, check=True, capture_output=True)
    shipped = sorted(p.name for p in DATA.glob("*.jsonl"))
    generated = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert generated == shipped == sorted(f"{name}.jsonl" for name in [*ALL_FILES, *GENERAL_FILES])
    for fname in shipped:
        assert (tmp_path / fname).read_bytes() == (DATA / fname).read_bytes(), fname
