"""stage=classify: the loss, class/row weights, packing, the tuned threshold, the label
mapping, bad rows, and a tiny model learning a separable task end to end (+ stage=eval on it)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from conftest import REPO, WORDS, compose, tiny_overrides, write_jsonl

from align import classify, data
from align.errors import AlignError
from align.stages import execute

# --------------------------------------------------------------------------- the loss


def test_focal_equals_cross_entropy_at_gamma_zero():
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 3), torch.tensor([0, 1, 2, 2, 1, 0, 1])
    ours = classify.classification_loss(logits, labels, gamma=0.0)
    assert torch.allclose(ours, torch.nn.functional.cross_entropy(logits, labels), atol=1e-6)


def test_focal_loss_matches_a_hand_computed_value():
    # two rows, binary; p(true) = sigmoid(l1 - l0)
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    labels = torch.tensor([1, 1])
    p1 = 1 / (1 + math.exp(-2.0))  # row 0: true class 1, logit gap +2
    p2 = 1 / (1 + math.exp(1.0))  # row 1: true class 1, logit gap -1
    gamma = 2.0
    want = ((1 - p1) ** gamma * -math.log(p1) + (1 - p2) ** gamma * -math.log(p2)) / 2
    got = classify.classification_loss(logits, labels, gamma=gamma)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert got.item() < classify.classification_loss(logits, labels).item()  # focal down-weights


def test_class_and_row_weights_scale_each_row_as_computed_by_hand():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.5, 0.5]])
    labels = torch.tensor([1, 0, 0])
    ce = [
        -math.log(1 / (1 + math.exp(-2.0))),
        -math.log(1 / (1 + math.exp(-1.0))),
        math.log(2.0),
    ]
    cw, rw = torch.tensor([1.0, 9.0]), torch.tensor([2.0, 1.0, 0.5])
    want_cw = (9.0 * ce[0] + 1.0 * ce[1] + 1.0 * ce[2]) / 3
    want_both = (9.0 * 2.0 * ce[0] + 1.0 * 1.0 * ce[1] + 1.0 * 0.5 * ce[2]) / 3
    assert classify.classification_loss(logits, labels, class_weights=cw).item() == pytest.approx(
        want_cw, rel=1e-5
    )
    got = classify.classification_loss(logits, labels, class_weights=cw, weights=rw)
    assert got.item() == pytest.approx(want_both, rel=1e-5)


def test_auto_class_weights_are_inverse_frequency():
    # 8 negatives, 2 positives: n / (K * n_k) = 10/16 and 10/4; the mean weight over the rows is 1
    labels = [0] * 8 + [1] * 2
    w = classify.class_weights_for("auto", labels, 2)
    assert w == pytest.approx([10 / 16, 10 / 4])
    assert sum(w[y] for y in labels) / len(labels) == pytest.approx(1.0)
    assert classify.class_weights_for([1, 3], labels, 2) == [1.0, 3.0]
    assert classify.class_weights_for(None, labels, 2) is None
    with pytest.raises(AlignError, match="no training rows"):
        classify.class_weights_for("auto", [0, 0], 2)
    with pytest.raises(AlignError, match="2 weights for 3 labels"):
        classify.class_weights_for([1, 2], [0, 1, 2], 3)
    with pytest.raises(AlignError, match="classify.class_weights"):
        classify.class_weights_for("inverse", labels, 2)


# --------------------------------------------------------------------------- packing


def test_packed_logits_equal_unpacked_for_very_different_lengths(tiny_model):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [1, 3, 117, 9, 60, 2, 33, 120, 5]
    ex = [{"input_ids": torch.randint(5, 500, (n,), generator=g).tolist(), "label": 0} for n in lengths]
    packed_batch = classify.collate(ex, 3, packing=True, max_length=128)
    assert packed_batch["input_ids"].shape[0] < len(ex)  # several examples share a row
    assert "attention_mask" not in packed_batch
    with torch.no_grad():
        padded = classify.class_logits(model, classify.collate(ex, 3))
        packed = classify.class_logits(model, packed_batch)
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits for e in ex])
    assert torch.allclose(packed, padded, atol=1e-4), (packed - padded).abs().max()
    assert torch.allclose(padded, alone, atol=1e-4)  # and both are what transformers' own head gives


def test_mean_pooling_is_the_head_on_mean_hidden_states_packed_or_not(tiny_model):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2).eval()
    g = torch.Generator().manual_seed(1)
    lengths = [1, 40, 7, 118, 3]
    ex = [{"input_ids": torch.randint(5, 500, (n,), generator=g).tolist(), "label": 0} for n in lengths]
    with torch.no_grad():
        packed = classify.class_logits(model, classify.collate(ex, 3, packing=True, max_length=128), "mean")
        padded = classify.class_logits(model, classify.collate(ex, 3), "mean")
        by_hand = []
        for e in ex:  # the head applied to the mean of the last layer's states, one example alone
            out = model(input_ids=torch.tensor([e["input_ids"]]), output_hidden_states=True)
            by_hand.append(model.score(out.hidden_states[-1][0].mean(0)))
        last = classify.class_logits(model, classify.collate(ex, 3), "last")
    by_hand = torch.stack(by_hand)
    assert torch.allclose(padded, by_hand, atol=1e-4), (padded - by_hand).abs().max()
    assert torch.allclose(packed, by_hand, atol=1e-4), (packed - by_hand).abs().max()
    assert torch.allclose(last[0], padded[0], atol=1e-6)  # one token: mean == last
    assert not torch.allclose(last[1:], padded[1:], atol=1e-3)


def test_a_kept_layer_is_the_head_on_that_layers_normed_states(tiny_model):
    from transformers import AutoModelForSequenceClassification

    from align import backbone

    full = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2).eval()
    cut = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2).eval()
    cut.score.load_state_dict(full.score.state_dict())
    backbone.keep_decoder_layers(cut, 1)
    assert len(cut.model.layers) == 1 and cut.config.num_hidden_layers == 1
    g = torch.Generator().manual_seed(2)
    ex = [{"input_ids": torch.randint(5, 500, (n,), generator=g).tolist(), "label": 0} for n in (1, 30, 7)]
    with torch.no_grad():
        got = classify.class_logits(cut, classify.collate(ex, 3, packing=True, max_length=64), "mean")
        by_hand = []
        for e in ex:  # the full model's states after layer 1, through the final norm and the head
            out = full(input_ids=torch.tensor([e["input_ids"]]), output_hidden_states=True)
            by_hand.append(full.score(full.model.norm(out.hidden_states[1][0])).mean(0))
        whole = classify.class_logits(full, classify.collate(ex, 3), "mean")
    assert torch.allclose(got, torch.stack(by_hand), atol=1e-4), (got - torch.stack(by_hand)).abs().max()
    assert not torch.allclose(got, whole, atol=1e-3)  # a different layer: different logits
    with pytest.raises(AlignError, match=r"classify.layer=3: this model has 2 decoder layers; choose 1..2"):
        backbone.keep_decoder_layers(full, 3)


def test_first_fit_decreasing_packing_respects_capacity():
    bins = classify.pack([100, 30, 70, 20, 90, 10], 128)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([100, 30, 70, 20, 90, 10][i] for i in b) <= 128 for b in bins)
    assert len(bins) == 3


# --------------------------------------------------------------------------- metrics


def test_tuned_threshold_maximises_f1_on_a_hand_made_list():
    y = [0, 0, 1, 0, 1, 1, 0, 1, 0, 0]
    s = [0.1, 0.2, 0.25, 0.3, 0.4, 0.55, 0.6, 0.7, 0.8, 0.05]
    t, f1 = classify.tuned_threshold(y, s)

    def f1_at(th):
        pred = [int(x >= th) for x in s]
        tp = sum(p and q for p, q in zip(pred, y, strict=False))
        fp = sum(p and not q for p, q in zip(pred, y, strict=False))
        fn = sum(q and not p for p, q in zip(pred, y, strict=False))
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    best = max(f1_at(th) for th in s)
    assert f1 == pytest.approx(best) and f1_at(t) == pytest.approx(best)
    assert best == pytest.approx(2 * 4 / (2 * 4 + 3))  # all 4 positives, 3 false positives: s >= 0.25
    assert t == pytest.approx(0.225)  # halfway to the next lower score (0.2): robust to last-bit noise
    m, details = classify.metrics(y, torch.tensor([[1 - x, x] for x in s]), classify.LabelMap(["0", "1"]))
    assert m["eval/threshold"] == pytest.approx(t) and m["eval/f1_tuned"] == pytest.approx(best)
    assert m["eval/f1"] == pytest.approx(f1_at(0.5))
    assert 0 < m["eval/roc_auc"] < 1 and 0 < m["eval/pr_auc"] <= 1
    assert details["confusion_matrix"] == [[3, 3], [0, 4]]  # rows: true class; at t=0.25: 3 FP, no FN
    assert sum(map(sum, details["confusion_matrix"])) == len(y)


# --------------------------------------------------------------------------- data


def test_label_mapping_from_ints_bools_and_strings():
    L = classify.LabelMap.from_labels
    assert L(["true", "false", "true"]).names == ["false", "true"]
    assert L(["1", "0"]).names == ["0", "1"]
    assert L(["10", "2", "3"]).names == ["2", "3", "10"]  # numeric order, not string order
    assert L(["safe", "vulnerable"]).names == ["safe", "vulnerable"]
    assert L(["b", "a"], order=["b", "a"]).names == ["b", "a"]
    with pytest.raises(AlignError, match="single label"):
        L(["x", "x"])
    with pytest.raises(AlignError, match="does not list"):
        L(["a", "c"], order=["a", "b"])
    assert [data.label_key(v) for v in (True, 0, 1.0, " yes ", "TRUE", "07")] == [
        "true",
        "0",
        "1",
        "yes",
        "true",
        "7",
    ]


def test_bad_rows_name_their_line(tmp_path):
    good = {"text": "def f(): pass", "label": 1}
    cases = {
        "missing column 'label'": {"text": "x"},
        "'label' is empty": {"text": "x", "label": None},
        "'text' is empty": {"text": "   ", "label": 0},
        "'weight' must be a finite number": {"text": "x", "label": 0, "weight": "heavy"},
        "'label' must be an integer": {"text": "x", "label": 1.5},
    }
    for msg, bad in cases.items():
        f = write_jsonl(tmp_path / "rows.jsonl", [good, good, bad])
        with pytest.raises(AlignError, match=f"rows.jsonl:3: {msg}"):
            data.validate_rows(data.read_rows(str(f)), "classify")


def test_unknown_label_at_eval_names_its_line(tmp_path):
    rows = data.validate_rows(
        data.read_rows(
            str(write_jsonl(tmp_path / "v.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 7}]))
        ),
        "classify",
    )

    class Tok:
        eos_token_id = 0

        def __call__(self, texts):
            return {"input_ids": [[1, 2]] * len(texts)}

    with pytest.raises(AlignError, match=r"v.jsonl:2: unknown label '7'"):
        classify.encode(rows, Tok(), classify.LabelMap(["0", "1"]), 16)


def test_columns_are_renamed_for_every_stage(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"code": "int x;", "target": True, "w": 2}])
    cols = {"text": "code", "label": "target", "weight": "w"}
    rows = data.validate_rows(data.read_rows(str(f)), "classify", cols)
    assert rows[0]["text"] == "int x;" and rows[0]["label"] == "true" and rows[0]["weight"] == 2.0
    p = write_jsonl(tmp_path / "p.jsonl", [{"q": "hi", "good": "a", "bad": "b"}])
    pref = data.validate_rows(
        data.read_rows(str(p)), "preference", {"prompt": "q", "chosen": "good", "rejected": "bad"}
    )
    assert pref == [{"prompt": "hi", "chosen": "a", "rejected": "b"}]
    with pytest.raises(AlignError, match=r"c.jsonl:1: missing column 'source' \(data.columns.text=source"):
        data.validate_rows(data.read_rows(str(f)), "classify", {"text": "source"})


def test_truncation_end_and_middle_are_counted():
    class Tok:
        eos_token_id = 99

        def __call__(self, texts):
            return {"input_ids": [list(range(int(t))) for t in texts]}

    rows = [{"text": "30", "label": "0"}, {"text": "5", "label": "1"}]
    lm = classify.LabelMap(["0", "1"])
    end = classify.encode(rows, Tok(), lm, 10, "end")
    mid = classify.encode(rows, Tok(), lm, 10, "middle")
    assert end.truncated == mid.truncated == 1
    assert end.input_ids[0] == list(range(10))
    assert mid.input_ids[0] == [0, 1, 2, 3, 4, 25, 26, 27, 28, 29]
    assert end.input_ids[1] == mid.input_ids[1] == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- end to end


def toy_rows(n: int, seed: int, words: list[str]) -> list[dict]:
    """Separable: a positive row contains "good", a negative row "bad", among random filler;
    every row ends with " end" (a fixed last token, like the "}" that ends a C function)."""
    rng = random.Random(seed)
    filler = [w for w in words if w not in ("good", "bad")]
    rows = []
    for i in range(n):
        label = i % 2 == 0
        ws = [rng.choice(filler) for _ in range(rng.randint(3, 40))]
        ws.insert(rng.randint(1, len(ws)), "good" if label else "bad")  # always " good" / " bad"
        rows.append({"code": " ".join(ws) + " end", "target": "yes" if label else "no", "id": f"r{i}"})
    return rows


def eval_again(run_dir, test, out):
    """stage=eval of a classify run on the toy test file: its metrics, and the per-row scores of
    the run's own predictions.jsonl and of the eval's (two {id: score} dicts)."""
    cols = ("data.columns.text=code", "data.columns.label=target")
    e = execute(
        compose("stage=eval", "tracking=disabled", f"eval.model={run_dir}", f"data.eval={test}", *cols),
        out,
    )
    scores = [
        {p["id"]: p["score"] for p in map(json.loads, (d / "predictions.jsonl").read_text().splitlines())}
        for d in (run_dir, out)
    ]
    return e, scores


def train_toy(tiny_model, d, *extra: str):
    """stage=classify on the toy task in ``d``: (run dir, metrics, held-out file)."""
    train = write_jsonl(d / "train.jsonl", toy_rows(192, 0, WORDS))
    test = write_jsonl(d / "test.jsonl", toy_rows(64, 1, WORDS))
    cfg = compose(
        "stage=classify",
        *tiny_overrides(
            tiny_model,
            f"data.train={train}",
            f"data.eval={test}",
            "data.max_eval_rows=null",
            "data.columns.text=code",
            "data.columns.label=target",
            *extra,
        ),
    )
    run_dir = d / "run"
    return run_dir, execute(cfg, run_dir), test


@pytest.fixture(scope="module")
def toy_run(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    # fp32 on every CPU: the export test compares the run's own scores with plain transformers in
    # fp32 to 1e-4, which a bf16-autocast run (auto, on a CPU with native bf16) meets only by luck
    return train_toy(
        tiny_model, d, "train.max_steps=48", "train.lr=3e-3", "classify.packing=true", "train.autocast=none"
    )


def test_a_tiny_model_learns_a_separable_task(toy_run):
    run_dir, m, _ = toy_run
    assert m["eval/roc_auc"] > 0.9, m
    assert m["eval/rows"] == 64
    for key in ("eval/roc_auc", "eval/pr_auc", "eval/f1", "eval/f1_tuned", "eval/threshold"):
        assert key in json.loads((run_dir / "metrics.json").read_text())
    preds = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 64 and {"id", "label", "score", "pred"} <= set(preds[0])
    assert preds[0]["id"] == "r0" and preds[0]["label"] == "yes"
    assert (run_dir / "roc.png").stat().st_size > 1000 and (run_dir / "pr.png").is_file()
    manifest = json.loads((run_dir / "artifact.json").read_text())
    assert manifest["stage"] == "classify" and manifest["data"]["classifier"]["labels"] == ["no", "yes"]


def test_label_mapping_and_threshold_survive_save_and_load(toy_run, tmp_path):
    """stage=eval on the run scores a file with string labels through the saved mapping and threshold."""
    run_dir, m, test = toy_run
    saved = classify.read_classifier(run_dir)
    assert saved["labels"] == ["no", "yes"] and saved["threshold"] == m["eval/threshold"]
    cfg = compose(
        "stage=eval",
        "tracking=disabled",
        f"eval.model={run_dir}",
        f"data.eval={test}",
        "data.columns.text=code",
        "data.columns.label=target",
    )
    e = execute(cfg, tmp_path / "eval")
    assert e["eval/roc_auc"] == pytest.approx(m["eval/roc_auc"], abs=1e-6)
    assert e["eval/threshold"] == saved["threshold"]
    assert e["eval/f1_saved_threshold"] == pytest.approx(m["eval/f1_tuned"], abs=1e-6)
    assert (tmp_path / "eval" / "predictions.jsonl").is_file()
    # a label the classifier never saw names its line
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"code": "good", "target": "yes"}, {"code": "x", "target": "maybe"}]
    )
    cfg = compose(
        "stage=eval",
        "tracking=disabled",
        f"eval.model={run_dir}",
        f"data.eval={bad}",
        "data.columns.text=code",
        "data.columns.label=target",
    )
    with pytest.raises(AlignError, match=r"bad.jsonl:2: unknown label 'maybe'"):
        execute(cfg, tmp_path / "eval-bad")


def test_mean_pooling_learns_and_stage_eval_uses_it_and_export_refuses(tiny_model, tmp_path):
    run_dir, m, test = train_toy(
        tiny_model,
        tmp_path,
        "train.max_steps=64",
        "train.lr=1e-2",  # the signal is 1 token in 4-42: the mean needs a larger step than "last"
        "classify.pooling=mean",
    )
    assert m["eval/roc_auc"] > 0.9, m
    assert classify.read_classifier(run_dir)["pooling"] == "mean"
    e, scores = eval_again(run_dir, test, tmp_path / "eval")
    # the saved pooling is used: the same scores, up to the adapter being merged in stage=eval
    # (1e-6 in fp32; up to ~3e-3 under bf16 autocast, which both sides use where the CPU has it)
    assert scores[1] == pytest.approx(scores[0], abs=1e-2)
    assert e["eval/roc_auc"] == pytest.approx(m["eval/roc_auc"], abs=1e-2)
    with pytest.raises(AlignError, match="classify.pooling=mean"):
        execute(compose("stage=export", "tracking=disabled", f"export.from={run_dir}"), tmp_path / "x")


def test_a_middle_layer_classifier_learns_trains_only_its_layers_and_stage_eval_reads_it(
    tiny_model, tmp_path
):
    from safetensors.torch import load_file

    run_dir, m, test = train_toy(
        tiny_model, tmp_path, "train.max_steps=48", "train.lr=3e-3", "classify.layer=1", "train.autocast=none"
    )
    assert m["eval/roc_auc"] > 0.9, m
    assert classify.read_classifier(run_dir)["layer"] == 1
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any(".layers.0." in k for k in saved) and not any(".layers.1." in k for k in saved)
    # stage=eval runs at the run's precision (fp32 here) even where its own `auto` would be bf16
    e, scores = eval_again(run_dir, test, tmp_path / "eval")
    assert scores[1] == pytest.approx(scores[0], abs=1e-4)  # the same one-layer model, fp32
    assert e["eval/roc_auc"] == pytest.approx(m["eval/roc_auc"], abs=1e-6)
    with pytest.raises(AlignError, match="classify.layer"):
        execute(compose("stage=export", "tracking=disabled", f"export.from={run_dir}"), tmp_path / "x")


def test_class_weights_focal_and_full_finetuning_run(tiny_model, tmp_path):
    rows = toy_rows(40, 3, WORDS)
    for r in rows:
        r["weight"] = 2.0 if r["target"] == "yes" else 1.0
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = compose(
        "stage=classify",
        *tiny_overrides(
            tiny_model,
            f"data.train={f}",
            "data.eval_fraction=0.25",
            "data.columns.text=code",
            "data.columns.label=target",
            "train.max_steps=2",
            "classify.loss=focal",
            "classify.focal_gamma=1.0",
            "classify.class_weights=auto",
            "adapter=none",
        ),
    )
    m = execute(cfg, tmp_path / "run")
    assert math.isfinite(m["train/loss"]) and "eval/roc_auc" in m
    assert not (tmp_path / "run" / "adapter" / "adapter_config.json").exists()  # a full model


def _cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "ALIGN_OUTPUT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "align", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["classify.loss=hinge"], "classify.loss"),
        (["classify.focal_gamma=-1"], "classify.focal_gamma=-1.0 must be >= 0"),
        (["classify.class_weights=inverse"], "classify.class_weights"),
        (["data.columns.txt=code"], "data.columns.text"),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(tmp_path, args, message):
    r = _cli("stage=classify", "tracking=disabled", *args, tmp_path=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "align: error:" in r.stderr and message in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_row_is_a_file_line_error(tiny_model, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": "b"}])
    r = _cli("stage=classify", *tiny_overrides(tiny_model, f"data.train={f}"), tmp_path=tmp_path)
    assert r.returncode == 2 and "t.jsonl:2: missing column 'label'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("adapter", ["lora", "qlora", "dora", "none"])
def test_the_head_is_trainable_with_every_adapter_kind(tiny_model, adapter):
    from align import backbone

    cfg = compose("stage=classify", *tiny_overrides(tiny_model, f"adapter={adapter}"))
    bb = backbone.build(cfg, task="seq_cls", num_labels=3)
    model = backbone.apply_adapter(bb.model, cfg, bb.peft_config, bb.runtime)
    head = {n: p for n, p in model.named_parameters() if "score" in n and p.requires_grad}
    assert head and all(p.shape[0] == 3 and p.dtype == torch.float32 for p in head.values()), head.keys()
    if adapter != "none":
        assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    batch = classify.collate([{"input_ids": [5, 6, 7], "label": 2}, {"input_ids": [8], "label": 0}], 3)
    loss = classify.classification_loss(class_logits := classify.class_logits(model, batch), batch["labels"])
    loss.backward()
    assert class_logits.shape == (2, 3)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.values())


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_a_bf16_base_trains_its_head_in_fp32(tiny_model, adapter):
    """A bf16 base (bf16 is what CUDA loads): the fresh head is fp32, takes the bf16 hidden states,
    gives fp32 logits, and keeps an Adam step at a small lr that bf16 weights would round away."""
    from align import backbone

    cfg = compose("stage=classify", *tiny_overrides(tiny_model, f"adapter={adapter}", "model.dtype=bfloat16"))
    bb = backbone.build(cfg, task="seq_cls", num_labels=3)
    model = backbone.apply_adapter(bb.model, cfg, bb.peft_config, bb.runtime)
    assert any(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "layers." in n)
    head = {n: p for n, p in model.named_parameters() if "score" in n and p.requires_grad}
    assert head and all(p.dtype == torch.float32 for p in head.values()), head
    batch = classify.collate([{"input_ids": [5, 6, 7], "label": 2}, {"input_ids": [8], "label": 0}], 3)
    logits = classify.class_logits(model, batch)
    assert logits.dtype == torch.float32
    before = {n: p.detach().clone() for n, p in head.items()}
    opt = torch.optim.Adam(list(head.values()), lr=1e-6)
    classify.classification_loss(logits, batch["labels"]).backward()
    opt.step()
    moved = [(p - before[n]).abs().max().item() for n, p in head.items()]
    assert all(0 < m < 1e-5 for m in moved), moved  # a 1e-6 step on ~0.1 weights: lost in bf16


# --------------------------------------------------------------------------- the shipped set


def _shipped(name: str) -> list[dict]:
    return [json.loads(x) for x in (REPO / "classify_data" / f"{name}.jsonl").read_text().splitlines()]


def test_shipped_code_defect_set_is_as_documented(tmp_path):
    sizes = {
        "defects_train": (2000, 0.5),
        "defects_test": (400, 0.5),
        "defects_imbalanced_train": (2000, 0.1),
        "defects_imbalanced_test": (400, 0.1),
    }
    for name, (n, pos) in sizes.items():
        rows = _shipped(name)
        assert len(rows) == n and sum(r["label"] for r in rows) == round(n * pos), name
        assert {r["language"] for r in rows} == {"python", "c"}
        assert len({r["category"] for r in rows}) == 5
        assert len({r["text"] for r in rows}) == n  # no duplicates
        # rows load through the classify row kind
        assert (
            len(data.validate_rows(data.read_rows(str(REPO / "classify_data" / f"{name}.jsonl")), "classify"))
            == n
        )
    train_t = {r["template"] for r in _shipped("defects_train")}
    test_t = {r["template"] for r in _shipped("defects_test")}
    assert train_t and test_t and not train_t & test_t  # held-out templates
    lengths = sorted(len(r["text"]) for r in _shipped("defects_train"))
    assert lengths[-1] > 8 * lengths[len(lengths) // 2]  # a long tail
    # the generator is seeded: it reproduces the shipped files byte for byte
    subprocess.run(
        [sys.executable, str(REPO / "classify_data" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in sizes:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (
            REPO / "classify_data" / f"{name}.jsonl"
        ).read_bytes()


def test_stage_defaults_to_the_shipped_set():
    cfg = compose("stage=classify")
    assert cfg.data.name == "defects" and cfg.classify.loss.value == "ce"
    assert data.source_paths(cfg.data, "classify")[0].endswith("classify_data/defects_train.jsonl")
    assert compose("stage=classify", "data=defects_imbalanced").data.name == "defects_imbalanced"
    assert compose("stage=dpo").data.name == "ifeval"  # other stages keep their data


def test_multiclass_metrics_and_row_weights_reach_the_batch():
    y = [0, 1, 2, 2, 1, 0]
    probs = torch.tensor(
        [[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6], [0.5, 0.1, 0.4], [0.3, 0.4, 0.3], [0.6, 0.3, 0.1]]
    )
    m, details = classify.metrics(y, probs, classify.LabelMap(["a", "b", "c"]))
    assert m["eval/accuracy"] == pytest.approx(5 / 6)
    assert m["eval/macro_f1"] == pytest.approx((0.8 + 1.0 + 2 / 3) / 3)  # F1 of a, b, c
    assert details["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [1, 0, 1]]
    assert m["eval/confusion/c->a"] == 1 and "eval/threshold" not in m and 0 < m["eval/roc_auc"] <= 1
    batch = classify.collate(
        [{"input_ids": [1, 2], "label": 1, "weight": 3.0}, {"input_ids": [4], "label": 0}],
        0,
        packing=True,
        max_length=8,
    )
    assert batch["weights"].tolist() == [3.0, 1.0] and batch["labels"].tolist() == [1, 0]
    assert batch["position_ids"].tolist() == [[0, 1, 0]] and batch["last_index"].tolist() == [1, 2]


def test_gradient_accumulation_divides_the_micro_batch_loss(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, gradient_accumulation_steps=2, report_to=[], max_steps=1
    )
    trainer = classify.ClassifierTrainer(
        model=model, args=args, data_collator=classify.Collator(3, False, 64)
    )
    batch = classify.collate([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8, 9], "label": 0}], 3)
    full = trainer.compute_loss(model, batch).item()
    trainer.current_gradient_accumulation_steps = 2  # what the training loop sets
    assert trainer.training_step(model, batch, num_items_in_batch=torch.tensor(2)).item() == pytest.approx(
        full / 2, rel=1e-5
    )


def test_wandb_offline_run_has_the_roc_and_pr_plots(tiny_model, tmp_path):
    from align.tracking import read_offline_run

    f = write_jsonl(tmp_path / "t.jsonl", toy_rows(32, 5, WORDS))
    cfg = compose(
        "stage=classify",
        *tiny_overrides(
            tiny_model,
            f"data.train={f}",
            "data.eval_fraction=0.25",
            "data.columns.text=code",
            "data.columns.label=target",
            "train.max_steps=2",
        ),
        "tracking=offline",
        "tracking.project=align-test",
    )
    m = execute(cfg, tmp_path / "run")
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    logged = read_offline_run(run)
    keys = {k.split("/")[1] for h in logged["history"] for k in h if k.startswith("eval/")}
    assert {"roc_table", "pr_table", "confusion_matrix_table", "roc_png", "pr_png"} <= keys, keys
    assert logged["summary"]["eval/roc_auc"] == pytest.approx(m["eval/roc_auc"])


def test_export_of_a_classify_run_predicts_the_same_with_plain_transformers(toy_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, m, test = toy_run
    execute(compose("stage=export", "tracking=disabled", f"export.from={run_dir}"), tmp_path / "export")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export" / "model").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "export" / "model")
    assert model.config.id2label == {0: "no", 1: "yes"}
    preds = {
        p["id"]: p["score"] for p in map(json.loads, (run_dir / "predictions.jsonl").read_text().splitlines())
    }
    for row in [json.loads(x) for x in test.read_text().splitlines()[:6]]:
        with torch.no_grad():
            p = model(**tok(row["code"], return_tensors="pt")).logits.softmax(-1)[0, 1].item()
        assert p == pytest.approx(preds[row["id"]], abs=1e-4)


def test_classify_slices_reports_roc_auc_per_slice_and_shows_an_inverted_one(tmp_path):
    """examples/classify_slices.py: per-slice ROC AUC of a run's predictions, joined by id; a
    slice the model ranks backwards reads below 0.5 even where the overall AUC looks fine."""
    rows, preds = [], []
    for i in range(8):
        lang, label = ("c" if i < 4 else "py"), i % 2
        score = (0.8 if label else 0.2) if lang == "c" else (0.4 if label else 0.6)  # py: inverted
        rows.append({"id": f"t{i}", "text": "x", "label": label, "language": lang})
        preds.append({"id": f"t{i}", "label_id": label, "score": score})
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "predictions.jsonl", preds)
    write_jsonl(tmp_path / "test.jsonl", rows)
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "classify_slices.py"), str(run)]
        + ["--data", str(tmp_path / "test.jsonl"), "--by", "language"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| language=c | 4 | 2 | 1.000 |" in out
    assert "| language=py | 4 | 2 | 0.000 |" in out


def test_packing_is_on_by_default_and_auto_off_for_prompt_learning_adapters():
    from align.config import classify_packing

    assert classify_packing(compose("stage=classify")) is True
    assert classify_packing(compose("stage=classify", "adapter=prompt")) is False  # auto: peft cannot pack it
    assert classify_packing(compose("stage=classify", "classify.packing=false")) is False


def test_a_sharded_bf16_base_keeps_its_head_in_the_base_dtype(tiny_model, monkeypatch):
    """Under FSDP every wrapped unit's tensors are flattened into one dtype: no fp32 head there."""
    from align import backbone

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = compose("stage=classify", *tiny_overrides(tiny_model, "model.dtype=bfloat16"))
    model = backbone.build(cfg, task="seq_cls", num_labels=3).model
    assert model.score.weight.dtype == torch.bfloat16
