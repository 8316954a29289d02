"""Strict programmatic checkers for IFEval-style verifiable instructions.

A *constraint* is a dict ``{"type": "<name>", **params}``, for example
``{"type": "max_words", "n": 40}``. Every checker is a pure function
``checker(response, **params) -> bool`` registered in :data:`INSTRUCTION_TYPES`.

* :func:`check` evaluates one constraint,
* :func:`judge` is the prompt-level strict verdict (all constraints pass),
* :func:`score` is the instruction-level accuracy (fraction passed),
* :func:`describe` renders the natural-language instruction used in prompts,
* :func:`ifeval_reward` adapts :func:`score` to the TRL ``GRPOTrainer``
  reward-function signature.

Constraint lists may also be given JSON-encoded as a string (that is how
``datasets`` stores nested, heterogeneous columns). Standard library only:
this module must import in milliseconds and never pull in torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "INSTRUCTION_TYPES",
    "check",
    "describe",
    "ifeval_reward",
    "judge",
    "parse_constraints",
    "score",
]

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_PARAGRAPH_SEP = re.compile(r"\n[ \t]*\n")
_JSON_FENCE = re.compile(r"^```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL | re.IGNORECASE)
_TITLE = re.compile(r"<<([^<>\n]+)>>")


def _word_pattern(word: str) -> re.Pattern[str]:
    # Whole-word, case-insensitive; lookarounds (not \b) so that keywords that
    # begin/end with non-word characters still behave sensibly.
    return re.compile(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)", re.IGNORECASE)


def _count_sentences(text: str) -> int:
    return sum(1 for piece in _SENTENCE_END.split(text.strip()) if piece.strip())


def _count_paragraphs(text: str) -> int:
    return sum(1 for piece in _PARAGRAPH_SEP.split(text.strip()) if piece.strip())


def _count_bullets(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.lstrip().startswith(("- ", "* ")))


def _first_word(text: str) -> str:
    # Strip leading punctuation/quotes/markup, take the first whitespace token,
    # then drop trailing punctuation ("Yes," -> "Yes").
    stripped = re.sub(r"^[\W_]+", "", text.strip())
    if not stripped:
        return ""
    return re.sub(r"[\W_]+$", "", stripped.split()[0])


def _strip_json_fence(text: str) -> str:
    text = text.strip()
    match = _JSON_FENCE.match(text)
    return match.group(1).strip() if match else text


# --------------------------------------------------------------------------- #
# Checkers: checker(response, **params) -> bool
# --------------------------------------------------------------------------- #
def _lowercase(response: str) -> bool:
    return not any(ch.isupper() for ch in response)


def _uppercase(response: str) -> bool:
    return any(ch.isalpha() for ch in response) and not any(ch.islower() for ch in response)


def _max_words(response: str, n: int) -> bool:
    return len(response.split()) <= int(n)


def _min_words(response: str, n: int) -> bool:
    return len(response.split()) >= int(n)


def _include_keyword(response: str, keyword: str) -> bool:
    return bool(keyword.strip()) and _word_pattern(keyword).search(response) is not None


def _forbidden_word(response: str, word: str) -> bool:
    return _word_pattern(word).search(response) is None


def _json_object(response: str, key: str) -> bool:
    try:
        obj = json.loads(_strip_json_fence(response))
    except ValueError:
        return False
    return isinstance(obj, dict) and key in obj


def _bullet_points(response: str, n: int) -> bool:
    return _count_bullets(response) == int(n)


def _end_with(response: str, phrase: str) -> bool:
    return response.strip().endswith(phrase)


def _no_commas(response: str) -> bool:
    return "," not in response


def _start_with(response: str, word: str) -> bool:
    first = _first_word(response)
    return bool(first) and first.casefold() == word.strip().casefold()


def _num_sentences(response: str, n: int) -> bool:
    return _count_sentences(response) == int(n)


def _num_paragraphs(response: str, n: int) -> bool:
    return _count_paragraphs(response) == int(n)


def _title(response: str) -> bool:
    return any(m.group(1).strip() for m in _TITLE.finditer(response))


INSTRUCTION_TYPES: dict[str, Callable[..., bool]] = {
    "lowercase": _lowercase,
    "uppercase": _uppercase,
    "max_words": _max_words,
    "min_words": _min_words,
    "include_keyword": _include_keyword,
    "forbidden_word": _forbidden_word,
    "json_object": _json_object,
    "bullet_points": _bullet_points,
    "end_with": _end_with,
    "no_commas": _no_commas,
    "start_with": _start_with,
    "num_sentences": _num_sentences,
    "num_paragraphs": _num_paragraphs,
    "title": _title,
}

_DESCRIPTIONS: dict[str, str] = {
    "lowercase": "Your entire response must be in lowercase letters. No capital letters are allowed.",
    "uppercase": "Your entire response must be in English, using capital letters only.",
    "max_words": "Answer with at most {n} words.",
    "min_words": "Answer with at least {n} words.",
    "include_keyword": 'Include the keyword "{keyword}" in your response.',
    "forbidden_word": 'Do not include the word "{word}" in your response.',
    "json_object": 'Format your entire response as a single JSON object with the key "{key}".',
    "bullet_points": (
        "Your answer must contain exactly {n} bullet points in markdown format,"
        ' each on its own line starting with "- " or "* ".'
    ),
    "end_with": 'End your response with the exact phrase "{phrase}" and nothing after it.',
    "no_commas": "Do not use any commas in your response.",
    "start_with": 'Start your response with the word "{word}".',
    "num_sentences": "Your response must contain exactly {n} sentences.",
    "num_paragraphs": "Your response must have exactly {n} paragraphs, separated by blank lines.",
    "title": "Include a title wrapped in double angular brackets, such as <<my title>>.",
}
assert _DESCRIPTIONS.keys() == INSTRUCTION_TYPES.keys()


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def _split(constraint: Mapping[str, Any]) -> tuple[str, Callable[..., bool], dict[str, Any]]:
    if not isinstance(constraint, Mapping) or "type" not in constraint:
        raise ValueError(f"a constraint must be a dict with a 'type' key, got {constraint!r}")
    kind = constraint["type"]
    checker = INSTRUCTION_TYPES.get(kind)
    if checker is None:
        known = ", ".join(sorted(INSTRUCTION_TYPES))
        raise ValueError(f"unknown instruction type {kind!r}; known types: {known}")
    # ``datasets`` loads heterogeneous constraint dicts as structs whose absent
    # fields are None; drop those so {"type": "lowercase", "n": None} still works.
    params = {k: v for k, v in constraint.items() if k != "type" and v is not None}
    return kind, checker, params


def parse_constraints(constraints: Any) -> list[dict[str, Any]]:
    """Normalise constraints: a list of dicts, one dict, or either JSON-encoded."""
    if isinstance(constraints, (str, bytes, bytearray)):
        constraints = json.loads(constraints)
    if isinstance(constraints, Mapping):
        return [dict(constraints)]
    if not isinstance(constraints, Iterable):
        raise ValueError(f"constraints must be a list of dicts, got {type(constraints).__name__}")
    out = []
    for item in constraints:
        if isinstance(item, (str, bytes, bytearray)):
            item = json.loads(item)
        out.append(item)
    return out


def check(constraint: Mapping[str, Any] | str, response: str) -> bool:
    """Whether ``response`` satisfies one constraint (strict)."""
    if isinstance(constraint, (str, bytes, bytearray)):
        constraint = json.loads(constraint)
    kind, checker, params = _split(constraint)
    try:
        return bool(checker(response, **params))
    except TypeError as err:
        raise ValueError(f"bad parameters {params!r} for instruction type {kind!r}: {err}") from err


def judge(constraints: Any, response: str) -> bool:
    """Prompt-level strict accuracy: ``True`` iff every constraint passes."""
    return all(check(c, response) for c in parse_constraints(constraints))


def score(constraints: Any, response: str) -> float:
    """Instruction-level accuracy: fraction of constraints passed (1.0 if none)."""
    parsed = parse_constraints(constraints)
    if not parsed:
        return 1.0
    return sum(check(c, response) for c in parsed) / len(parsed)


def describe(constraint: Mapping[str, Any] | str) -> str:
    """The natural-language instruction text for a constraint, as used in prompts."""
    if isinstance(constraint, (str, bytes, bytearray)):
        constraint = json.loads(constraint)
    kind, _, params = _split(constraint)
    try:
        return _DESCRIPTIONS[kind].format(**params)
    except KeyError as err:
        raise ValueError(f"instruction type {kind!r} needs parameter {err}") from err


def _completion_text(completion: Any) -> str:
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    messages = list(completion)
    if not messages:
        return ""
    content = messages[-1].get("content") if isinstance(messages[-1], Mapping) else messages[-1]
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # Multimodal-style content: a list of parts such as {"type": "text", "text": ...}.
    return "".join(part.get("text", "") if isinstance(part, Mapping) else str(part) for part in content)


def ifeval_reward(prompts, completions, constraints=None, **kwargs) -> list[float]:
    """TRL ``GRPOTrainer`` reward function: :func:`score` for each completion.

    ``completions`` are strings (standard format) or lists of ``{"role", "content"}``
    messages (conversational format; the last message is scored). ``constraints``
    is the dataset column of the same name: one constraint list per sample,
    possibly JSON-encoded.

    An empty (or whitespace-only) completion earns 0: as IFEval checks it, it passes every
    constraint that forbids something (lowercase, no commas, at most n words), 0.32 on average
    over the shipped training prompts, about what an SFT model's real answers earn, so a policy
    trained against this reward can learn to stop at once (docs/ppo.md, TRL 1.12's PPO).
    Evaluation scores with :func:`score` and keeps IFEval's verdict.
    """
    if constraints is None:
        raise ValueError("ifeval_reward needs a 'constraints' column (one constraint list per sample)")
    if len(constraints) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(constraints)} constraint lists")
    texts = [_completion_text(comp) for comp in completions]
    return [
        float(score(cons, text)) if text.strip() else 0.0
        for text, cons in zip(texts, constraints, strict=True)
    ]
