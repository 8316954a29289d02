"""The forgetting check of stage=eval (and train.eval_at_end): zero/equal for the base against
itself, moving the right way for a tiny model over-fitted on a narrow task; the shipped general
data; the answer matching and the verdict."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, compose, tiny_overrides, write_jsonl

from align import backbone, evaluation
from align.stages import execute

TEXTS = [
    "The river runs to the ocean and the rain falls on the mountain.",
    "Bees make honey in summer and the forest is quiet in winter.",
    "Music and light fill the city at night under the moon and the stars.",
    "People plant trees in the spring, and the wind moves the clouds.",
]
QUESTIONS = [
    "Tell me about the sun.",
    "What is snow?",
    "Name a planet.",
    "Say yes or no.",
    "What is fire?",
    "Is ice cold?",
]


@pytest.fixture(scope="module")
def general_base(tiny_model, tmp_path_factory):
    """A base that knows the general texts: the random tiny model trained on them (a random model
    knows nothing to forget; any tuning would lower its perplexity everywhere)."""
    import torch

    d = tmp_path_factory.mktemp("general-base")
    cfg = compose("stage=eval", *tiny_overrides(tiny_model))
    model = backbone.load_base_model(str(tiny_model), cfg, backbone.detect_runtime(cfg))
    tok = backbone.load_tokenizer(str(tiny_model), cfg.model)
    batch = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    width = max(map(len, batch))
    ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in batch])
    labels = torch.tensor([x + [-100] * (width - len(x)) for x in batch])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss.backward()
        opt.step()
    model.save_pretrained(d, safe_serialization=True)
    for f in tiny_model.iterdir():  # the tokenizer files exactly as the tiny model ships them
        if f.name.startswith(("tokenizer", "special_tokens")):
            (d / f.name).write_bytes(f.read_bytes())
    return d


@pytest.fixture(scope="module")
def general_dir(general_base, tmp_path_factory):
    """General data for the general base; the short answers are its own greedy first words, so
    the base gets every one right."""
    tiny_model = general_base
    d = tmp_path_factory.mktemp("general")
    cfg = compose("stage=eval", *tiny_overrides(tiny_model))
    rt = backbone.detect_runtime(cfg)
    model = backbone.load_base_model(str(tiny_model), cfg, rt)
    tok = backbone.load_tokenizer(str(tiny_model), cfg.model)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    gens = evaluation.generate(model, tok, prompts, max_new_tokens=24, batch_size=0)
    qa = [
        {"prompt": p, "answer": evaluation.normalize_answer(g.text).split()[0]}
        for p, g in zip(prompts, gens, strict=True)
        if evaluation.normalize_answer(g.text)
    ]
    assert len(qa) >= 3
    write_jsonl(d / "general_text.jsonl", [{"text": t} for t in TEXTS])
    write_jsonl(d / "general_prompts.jsonl", [{"prompt": p} for p in prompts])
    write_jsonl(d / "general_qa.jsonl", qa)
    return d


def test_answer_matching_and_the_verdict():
    assert evaluation.answer_matches("12", "7 + 5 = 12.")
    assert evaluation.answer_matches("Paris", "The capital is Paris!")
    assert evaluation.answer_matches("carbon dioxide", "Carbon-dioxide")
    assert not evaluation.answer_matches("1", "12")
    assert not evaluation.answer_matches("Rome", "Paris")
    same = {"forgetting/ppl_ratio": 1.0, "forgetting/qa_retained": 1.0, "forgetting/qa_base_correct": 20.0}
    assert evaluation.forgetting_verdict(same).startswith("no forgetting")
    worse = same | {"forgetting/ppl_ratio": 1.3}
    assert evaluation.forgetting_verdict(worse).startswith("FORGETTING: general-text perplexity x1.30")
    lost = same | {"forgetting/qa_retained": 0.8}  # 4 of 20 lost
    assert "lost 4 of 20" in evaluation.forgetting_verdict(lost)
    one = {"forgetting/ppl_ratio": 1.0, "forgetting/qa_retained": 0.5, "forgetting/qa_base_correct": 2.0}
    assert evaluation.forgetting_verdict(one).startswith("no forgetting")  # 1 answer is not a verdict


def test_forgetting_of_the_base_against_itself_is_zero(general_base, general_dir):
    tiny_model = general_base
    cfg = compose("stage=eval", *tiny_overrides(tiny_model, f"eval.general={general_dir}"))
    model = backbone.load_base_model(str(tiny_model), cfg, backbone.detect_runtime(cfg))
    tok = backbone.load_tokenizer(str(tiny_model), cfg.model)
    texts, prompts, qa, info = evaluation.general_rows(cfg)
    assert info == {"dir": str(general_dir), "texts": 4, "prompts": 6, "qa": len(qa)}
    base = evaluation.Subject("base", model)
    m, lost = evaluation.forgetting_metrics(
        base, base, tok, texts, prompts, qa, max_length=128, max_new_tokens=16
    )
    assert m["forgetting/ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert m["forgetting/ppl"] == pytest.approx(m["forgetting/ppl_base"])
    assert m["forgetting/kl_base_tuned"] == pytest.approx(0.0, abs=1e-4)
    assert m["forgetting/qa_base_accuracy"] == 1.0 and m["forgetting/qa_retained"] == 1.0
    assert m["forgetting/flag"] == 0.0 and lost == []


def test_forgetting_moves_for_a_model_overfitted_on_a_narrow_task(general_base, general_dir, tmp_path):
    """From a base that knows the general texts, full fine-tuning at a large lr on 32 rows of one
    task: the general text gets less likely, the base's own answers too, and known short answers
    are lost. train.eval_at_end reports it."""
    tiny_model = general_base
    run = tmp_path / "sft"
    cfg = compose(
        "stage=sft",
        *tiny_overrides(
            tiny_model,
            "data=tiny",
            "adapter=none",
            "train.max_steps=30",
            "train.lr=3e-3",
            "train.eval_at_end=true",
            f"eval.general={general_dir}",
            "eval.max_prompts=2",
            "eval.max_pairs=2",
            "eval.max_new_tokens=8",
        ),
    )
    m = execute(cfg, run)
    assert m["eval/forgetting/ppl_ratio"] > 1.1
    assert m["eval/forgetting/kl_base_tuned"] > 0.1
    assert m["eval/forgetting/qa_retained"] < 1.0
    assert m["eval/forgetting/flag"] == 1.0
    report = json.loads((run / "eval.json").read_text())
    assert report["forgetting"]["verdict"].startswith("FORGETTING")
    assert "forgetting/ppl_ratio" in report["metrics"]["model"]
    md = (run / "report.md").read_text()
    assert "## Forgetting" in md and "FORGETTING" in md


def test_shipped_general_data_is_reproducible_and_disjoint(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "reward_data" / "generate_general.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    rows = {}
    for name in ("general_text", "general_prompts", "general_qa", "general_sft"):
        shipped = (REPO / "reward_data" / f"{name}.jsonl").read_text()
        assert (tmp_path / f"{name}.jsonl").read_text() == shipped, f"{name} is not what the generator writes"
        rows[name] = [json.loads(x) for x in shipped.splitlines()]
    assert sum(len(v) for v in rows.values()) >= 250
    held_out = {r["prompt"][0]["content"] for r in rows["general_qa"]}
    replay = {r["messages"][0]["content"] for r in rows["general_sft"]}
    assert not held_out & replay  # replay never trains on a held-out question
    assert all(r["answer"] for r in rows["general_qa"]) and not math.isnan(len(rows["general_text"]))
