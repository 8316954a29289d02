"""Held-out alignment metrics: what stage=eval (and ``train.eval_at_end``) reports.

For the evaluated model and, side by side, its baseline (the same base with adapters
disabled), on the held-out test prompts and pairs (``reward_data/prompts_test.jsonl``,
``pairs_test.jsonl`` unless ``eval.prompts`` / ``eval.pairs`` say otherwise):

* instruction following by the strict judges (``align.judges``), prompt- and
  instruction-level, overall and per instruction type, as IFEval reports them;
* preference accuracy: how often the summed log-likelihood of the chosen completion
  beats the rejected one's; for a DPO run also its implicit reward against its reference;
* KL to the base on the model's own completions, and completion length (tokens, words);
* with ``eval.reward=<rm run>``: the mean reward-model score and the win-rate by it
  (without it the win-rate is judged by the strict judges);
* the forgetting check on general data unrelated to training (``eval.forgetting``,
  docs/methods.md): general-text perplexity, KL(base || model) and known short answers kept.

Exact definitions: docs/eval.md. Everything here is plain functions over lists so the
metric code is testable without a model; :func:`run` wires them to models and files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align import judges
from align.config import POLICY_STAGES  # stages whose output is a policy (re-exported)
from align.errors import AlignError

log = logging.getLogger(__name__)

EVAL_JSON = "eval.json"
REPORT_MD = "report.md"
# the headline rows of report.md and of the printed summary, in order
HEADLINE = [
    "ifeval/prompt_accuracy",
    "ifeval/instruction_accuracy",
    "pref/accuracy",
    "dpo/reward_accuracy",
    "rm/score",
    "win_rate/rm",
    "win_rate/judge",
    "kl/token",
    "length/tokens",
    "length/words",
    "forgetting/ppl_ratio",
    "forgetting/kl_base_tuned",
    "forgetting/qa_retained",
]


# --------------------------------------------------------------------------- metrics (pure)


def ifeval_metrics(
    constraints: list[Any], completions: list[str]
) -> tuple[dict[str, float], dict[str, dict]]:
    """Strict IFEval accuracies of ``completions`` (one constraint list per completion).

    Returns ``(metrics, per_type)``: prompt-level accuracy (every instruction of a prompt
    passes), instruction-level accuracy (passed instructions / all instructions), and per
    instruction type its instruction count and accuracy, and the prompt-level accuracy of
    the prompts that carry that type.
    """
    if len(constraints) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(constraints)} constraint lists")
    n_prompts = n_prompt_pass = n_inst = n_inst_pass = 0
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for cons, text in zip(constraints, completions, strict=True):
        parsed = judges.parse_constraints(cons)
        results = [(c["type"], judges.check(c, text)) for c in parsed]
        all_pass = all(ok for _, ok in results)
        n_prompts += 1
        n_prompt_pass += all_pass
        n_inst += len(results)
        n_inst_pass += sum(ok for _, ok in results)
        for kind, ok in results:
            by_type[kind]["instructions"] += 1
            by_type[kind]["passed"] += ok
        for kind in {k for k, _ in results}:
            by_type[kind]["prompts"] += 1
            by_type[kind]["prompts_passed"] += all_pass
    metrics = {
        "ifeval/prompt_accuracy": n_prompt_pass / n_prompts if n_prompts else math.nan,
        "ifeval/instruction_accuracy": n_inst_pass / n_inst if n_inst else math.nan,
        "ifeval/prompts": float(n_prompts),
        "ifeval/instructions": float(n_inst),
    }
    per_type = {
        kind: {
            "instructions": d["instructions"],
            "instruction_accuracy": d["passed"] / d["instructions"],
            "prompts": d["prompts"],
            "prompt_accuracy": d["prompts_passed"] / d["prompts"],
        }
        for kind, d in sorted(by_type.items())
    }
    return metrics, per_type


def preference_metrics(chosen: list[float], rejected: list[float], prefix: str = "pref") -> dict[str, float]:
    """Pairwise accuracy (chosen scored higher; a tie counts half) and mean margin."""
    if not chosen:
        return {}
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)]
    return {
        f"{prefix}/accuracy": sum(wins) / len(wins),
        f"{prefix}/margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(chosen),
        f"{prefix}/pairs": float(len(chosen)),
    }


def win_rate(model_scores: list[float], baseline_scores: list[float]) -> float:
    """Fraction of prompts where the model's score beats the baseline's (a tie counts half)."""
    if not model_scores:
        return math.nan
    wins = [
        1.0 if m > b else 0.5 if m == b else 0.0 for m, b in zip(model_scores, baseline_scores, strict=True)
    ]
    return sum(wins) / len(wins)


def kl_metrics(model_logps: list[list[float]], ref_logps: list[list[float]]) -> dict[str, float]:
    """KL estimate on the model's own completions: per token (pooled over all generated
    tokens) and per sequence (mean of the summed log-ratios)."""
    total = tokens = 0.0
    per_seq = []
    for m, r in zip(model_logps, ref_logps, strict=True):
        s = sum(a - b for a, b in zip(m, r, strict=True))
        per_seq.append(s)
        total += s
        tokens += len(m)
    return {
        "kl/token": total / tokens if tokens else 0.0,
        "kl/sequence": sum(per_seq) / len(per_seq) if per_seq else 0.0,
    }


def length_metrics(gens: list[Generation]) -> dict[str, float]:
    if not gens:
        return {}
    n = len(gens)
    return {
        "length/tokens": sum(g.n_tokens for g in gens) / n,
        "length/words": sum(len(g.text.split()) for g in gens) / n,
        "length/truncated": sum(g.truncated for g in gens) / n,
    }


# --------------------------------------------------------------------------- generation and log-probs


@dataclass
class Generation:
    text: str
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # generated ids, up to and including the stop token
    n_tokens: int = 0  # generated tokens before the stop token
    truncated: bool = False  # hit eval.max_new_tokens without a stop token
    logprobs: list[float] | None = None  # greedy: the model's log-prob of each of ``ids``


def generate(
    model,
    tokenizer,
    prompts: list[Any],
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    device: str | None = None,
    desc: str = "generate",
) -> list[Generation]:
    """One completion per prompt (greedy when ``temperature == 0``) through align.sampling:
    adapter merged while sampling, length-sorted batches (``batch_size=0``: sized by memory),
    finished rows dropped from the batch."""
    from align import sampling

    done = sampling.sample(
        model,
        sampling.encode_prompts(tokenizer, prompts),
        sampling.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p),
        stop=sampling.stop_ids(tokenizer, model),
        pad_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        device=device,
        desc=desc,
    )
    return [
        Generation(
            text=tokenizer.decode(c.ids[: c.n_tokens], skip_special_tokens=True).strip(),
            prompt_ids=c.prompt_ids,
            ids=c.ids,
            n_tokens=c.n_tokens,
            truncated=c.truncated,
            logprobs=c.logprobs,
        )
        for c in done
    ]


def token_logps(
    model, pairs: list[tuple[list[int], list[int]]], *, batch_size: int, device: str, desc: str = "log-probs"
) -> list[list[float]]:
    """Per-token log-probs of each completion given its prompt (both given as token ids):
    length-sorted batches, only completion positions through the LM head (chunked)."""
    from align import sampling

    return sampling.completion_logprobs(model, pairs, batch_size=batch_size, device=device, desc=desc)


def pair_token_ids(tokenizer, prompt: Any, completion: Any, max_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a preference example, formatted as training saw it:
    the chat template of prompt + completion, split where the generation prompt ends."""
    if isinstance(prompt, str):
        p_text, c_text = prompt, completion if isinstance(completion, str) else completion[-1]["content"]
    else:
        from align.sampling import render_prompt

        p_text = render_prompt(tokenizer, prompt)
        full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
        c_text = full[len(p_text) :] if full.startswith(p_text) else completion[-1]["content"]
    p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(c_text, add_special_tokens=False)["input_ids"]
    return p_ids, c_ids[: max(1, max_length - len(p_ids))]


# --------------------------------------------------------------------------- models


@dataclass
class Subject:
    """A model to evaluate: ``model`` run with its active adapter, with a named adapter, or
    with adapters disabled (the base under a LoRA run, no second copy in memory)."""

    label: str
    model: Any
    adapter: str | None = "default"  # None: adapters disabled

    @contextlib.contextmanager
    def active(self):
        has_peft = hasattr(self.model, "peft_config")
        if not has_peft:
            yield self.model
        elif self.adapter is None:
            with self.model.disable_adapter():
                yield self.model
        else:
            previous = self.model.active_adapter
            self.model.set_adapter(self.adapter)
            try:
                yield self.model
            finally:
                self.model.set_adapter(previous)


@dataclass
class Loaded:
    model: Subject
    baseline: Subject | None  # side by side (eval.baseline=base)
    kl_ref: Subject | None  # the base, for KL (None: the model is the base)
    dpo_ref: Subject | None  # a DPO run's reference (its init adapter, or the base)
    dpo_beta: float | None
    tokenizer: Any
    device: str
    cfg: Any  # the config with the evaluated run's model/adapter sections
    info: dict[str, Any]
    autocast: Any = None  # bf16 mixed precision of the evaluated run's runtime (train.autocast)

    def __post_init__(self):
        self.info["precision"] = (
            "bf16 autocast" if self.autocast is not None else "no autocast (the weights' dtype)"
        )

    def precision(self):
        """Every generation and scoring forward of the report runs under it: the run's
        ``train.autocast`` (bf16 where the hardware computes it natively, as the run trained;
        ``train.autocast=none`` on the eval command pins fp32)."""
        from align.sampling import autocast_context

        return autocast_context(self.device, self.autocast)


def _cfg_from_run(cfg: Any, run_dir: Path, base_model: str) -> Any:
    """``cfg`` with the model/adapter sections the run was trained with (its config.yaml), and
    its precision (``train.autocast``) unless the eval command pins one (anything but ``auto``)."""
    from omegaconf import OmegaConf, open_dict

    from align.config import Autocast

    new = copy.deepcopy(cfg)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = OmegaConf.load(saved)
        for section in ("model", "adapter"):
            if section in old:
                keep = {k: v for k, v in OmegaConf.to_container(old[section]).items() if k in new[section]}
                new[section] = OmegaConf.merge(new[section], keep)
        trained = OmegaConf.select(old, "train.autocast")
        if trained is not None and Autocast(new.train.autocast) == Autocast.auto:
            new.train.autocast = Autocast(trained)
    with open_dict(new):
        new.model.name_or_path = base_model
    return new


def _run_beta(run_dir: Path) -> float | None:
    from omegaconf import OmegaConf

    saved = run_dir / "config.yaml"
    if saved.is_file():
        beta = OmegaConf.select(OmegaConf.load(saved), "dpo.beta")
        return float(beta) if beta is not None else None
    return None


def load(cfg: Any, spec: str) -> Loaded:
    """Load what ``eval.model=spec`` names, with its baseline and references."""
    from align import artifacts, backbone

    want_baseline = cfg.eval.baseline == "base"
    spec = str(spec)
    path = Path(spec).expanduser()
    info: dict[str, Any] = {"spec": spec}
    if spec == "base":
        rt = backbone.detect_runtime(cfg)
        base_path = backbone.resolve_model_path(cfg.model)
        model = backbone.load_base_model(base_path, cfg, rt)
        tok = backbone.load_tokenizer(base_path, cfg.model)
        info |= {"kind": "base", "base_model": cfg.model.name_or_path}
        if want_baseline:
            log.info("eval.model=base: the model is the baseline; no side-by-side comparison")
        return Loaded(
            Subject("model", model), None, None, None, None, tok, rt.device, cfg, info, rt.autocast_dtype
        )

    if path.is_dir() and (path / artifacts.MANIFEST).is_file():
        art = artifacts.read(path, key="eval.model")
        if art.stage not in POLICY_STAGES:
            hint = " (score with a reward model: eval.reward=<rm run dir>)" if art.stage == "rm" else ""
            raise AlignError(
                f"eval.model={spec}: is the output of stage={art.stage}, not a policy; give an "
                f"{'/'.join(POLICY_STAGES)} run{hint}"
            )
        if art.base_model != cfg.model.name_or_path:
            log.info("eval.model=%s was trained on %s: evaluating on that base", spec, art.base_model)
        run_cfg = _cfg_from_run(cfg, art.run_dir, art.base_model)
        rt = backbone.detect_runtime(run_cfg)
        base_path = backbone.resolve_model_path(run_cfg.model)
        tok = backbone.load_tokenizer(base_path, run_cfg.model)
        info |= {"kind": "run", "stage": art.stage, "run_dir": str(art.run_dir), "base_model": art.base_model}
        if art.adapter_kind in ("none", "freeze"):  # full fine-tune / layer freezing: a second model
            if art.adapter_kind == "none":
                model = backbone.load_base_model(str(art.adapter_dir), run_cfg, rt)
            else:  # the base with the run's trained blocks written in
                model = backbone.load_base_model(base_path, run_cfg, rt)
                backbone.load_freeze_weights(model, art.adapter_dir)
            base = backbone.load_base_model(base_path, run_cfg, rt)
            ref = Subject("baseline", base)
            return Loaded(
                Subject("model", model),
                ref if want_baseline else None,
                ref,
                None,
                None,
                tok,
                rt.device,
                run_cfg,
                info,
                rt.autocast_dtype,
            )
        base = backbone.load_base_model(base_path, run_cfg, rt)
        model = backbone.load_adapter(base, art.adapter_dir, trainable=False)
        base_subject = Subject("baseline", model, adapter=None)
        dpo_ref = None
        beta = None
        if art.stage == "dpo":
            beta = cfg.eval.dpo_beta if cfg.eval.dpo_beta is not None else _run_beta(art.run_dir)
            beta = beta if beta is not None else float(cfg.dpo.beta)
            init = art.manifest.get("data", {}).get("init")
            if init:  # the reference of a DPO run that started from an SFT run is that SFT adapter
                init_art = artifacts.read(init, key=f"{spec} (dpo.init)")
                backbone.load_adapter(model, init_art.adapter_dir, trainable=False, name="reference")
                dpo_ref = Subject("reference", model, adapter="reference")
                info["dpo_reference"] = str(init_art.run_dir)
            else:
                dpo_ref = base_subject
                info["dpo_reference"] = "base model (adapters disabled)"
        return Loaded(
            Subject("model", model),
            base_subject if want_baseline else None,
            base_subject,
            dpo_ref,
            beta,
            tok,
            rt.device,
            run_cfg,
            info,
            rt.autocast_dtype,
        )

    # a model directory or a hub id: a full model, compared with the configured base
    if path.is_file():
        raise AlignError(
            f"eval.model={spec}: is a file; give a run directory, a model directory, a hub id or base"
        )
    from omegaconf import open_dict

    model_cfg = copy.deepcopy(cfg)
    with open_dict(model_cfg):
        model_cfg.model.name_or_path = spec
    rt = backbone.detect_runtime(model_cfg)
    model_path = backbone.resolve_model_path(model_cfg.model)
    tok = backbone.load_tokenizer(model_path, model_cfg.model)
    model = backbone.load_base_model(model_path, model_cfg, rt)
    info |= {"kind": "model", "base_model": cfg.model.name_or_path}
    ref = None
    if want_baseline:
        base_path = backbone.resolve_model_path(cfg.model)
        ref = Subject("baseline", backbone.load_base_model(base_path, cfg, rt))
    return Loaded(Subject("model", model), ref, ref, None, None, tok, rt.device, cfg, info, rt.autocast_dtype)


# --------------------------------------------------------------------------- data


def held_out_rows(cfg: Any) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(prompts, pairs, info): the first eval.max_prompts / eval.max_pairs held-out rows."""
    from align import data

    e = cfg.eval
    base = data.reward_data_dir()
    prompts_src = e.prompts or str(base / "prompts_test.jsonl")
    pairs_src = e.pairs or str(base / "pairs_test.jsonl")
    prompts = (
        data.validate_rows(data.read_rows(prompts_src), "prompt")[: e.max_prompts] if e.max_prompts else []
    )
    pairs = data.validate_rows(data.read_rows(pairs_src), "preference")[: e.max_pairs] if e.max_pairs else []
    if prompts and "constraints" not in prompts[0]:
        raise AlignError(f"{prompts_src}: prompt rows need a 'constraints' column for the judges")
    info = {"prompts": prompts_src if prompts else None, "pairs": pairs_src if pairs else None}
    return prompts, pairs, info | {"prompt_rows": len(prompts), "pair_rows": len(pairs)}


# --------------------------------------------------------------------------- forgetting

# The verdict's thresholds (docs/methods.md): the base against itself gives exactly ratio 1, KL 0
# and 100% retained, so they only need to clear what a benign tune moves. A LoRA SFT on the
# shipped data moves held-out general perplexity by a few percent; 10% more is beyond that.
# Losing more than 1 in 10 short answers the base knew (and at least 2, so one flipped answer of
# a small set is not a verdict) is a loss a user would notice.
FORGET_PPL_RATIO = 1.10
FORGET_RETAINED = 0.90
FORGET_MIN_LOST = 2
FORGETTING_TITLE = "## Forgetting (general data unrelated to training)"


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles dropped, whitespace collapsed (SQuAD-style)."""
    import re

    text = re.sub(r"[^\w\s.-]", " ", text.lower()).replace("-", " ")
    words = [w.strip(".") for w in text.split()]
    return " ".join(w for w in words if w and w not in ("a", "an", "the"))


def answer_matches(answer: str, completion: str) -> bool:
    """Exact match of the normalized answer with the normalized completion, or with a whole-word
    span of it (``12`` matches ``7 + 5 = 12.``; ``1`` does not match ``12``)."""
    a, c = normalize_answer(answer), normalize_answer(completion)
    return bool(a) and (a == c or f" {a} " in f" {c} ")


def perplexity(logps: list[list[float]]) -> float:
    """exp of the mean negative log-prob, pooled over every token of every text."""
    n = sum(len(x) for x in logps)
    return math.exp(-sum(sum(x) for x in logps) / n) if n else math.nan


def forgetting_verdict(m: dict[str, float]) -> str:
    """One line: whether the tuned model forgot general ability, by the thresholds above."""
    reasons = []
    ratio = m.get("forgetting/ppl_ratio", math.nan)
    if ratio > FORGET_PPL_RATIO:
        reasons.append(f"general-text perplexity x{ratio:.2f} the base's (threshold x{FORGET_PPL_RATIO:.2f})")
    kept, known = m.get("forgetting/qa_retained", math.nan), m.get("forgetting/qa_base_correct", 0.0)
    lost = round((1 - kept) * known) if not math.isnan(kept) else 0
    if not math.isnan(kept) and kept < FORGET_RETAINED and lost >= FORGET_MIN_LOST:
        reasons.append(f"lost {lost} of {known:.0f} short answers the base got right ({kept:.0%} kept)")
    if reasons:
        return (
            "FORGETTING: " + "; ".join(reasons) + " (reduce it: lower train.lr, a PEFT method, data.replay)"
        )
    return f"no forgetting beyond the thresholds (perplexity x{ratio:.2f} <= x{FORGET_PPL_RATIO:.2f}; " + (
        f"{kept:.0%} of {known:.0f} known answers kept)" if not math.isnan(kept) else "no known answers)"
    )


def general_rows(cfg: Any) -> tuple[list[str], list[Any], list[dict], dict[str, Any]]:
    """(texts, prompts, qa rows, info): the first eval.max_general rows of each general file."""
    from align import data

    e = cfg.eval
    d = Path(e.general).expanduser() if e.get("general") else data.reward_data_dir()
    n = int(e.max_general)
    paths = {k: d / f"general_{k}.jsonl" for k in ("text", "prompts", "qa")}
    for k, p in paths.items():
        if not p.is_file():
            raise AlignError(
                f"eval.general={d}: no general_{k}.jsonl (the forgetting check reads general_text, general_prompts "
                "and general_qa.jsonl; see reward_data/generate_general.py), or set eval.forgetting=false"
            )
    texts = [r.data["text"] for r in data.read_rows(str(paths["text"]))][:n]
    prompts = [r["prompt"] for r in data.validate_rows(data.read_rows(str(paths["prompts"])), "prompt")][:n]
    qa = []
    for r in data.read_rows(str(paths["qa"]))[:n]:
        if "prompt" not in r.data or "answer" not in r.data:
            raise AlignError(f"{r.where}: a general_qa row needs 'prompt' and 'answer'")
        qa.append({"prompt": r.data["prompt"], "answer": str(r.data["answer"])})
    info = {"dir": str(d), "texts": len(texts), "prompts": len(prompts), "qa": len(qa)}
    return texts, prompts, qa, info


def forgetting_metrics(
    base: Subject,
    tuned: Subject,
    tokenizer: Any,
    texts: list[str],
    prompts: list[Any],
    qa: list[dict],
    *,
    max_length: int,
    max_new_tokens: int,
    batch_size: int = 0,
    device: str | None = None,
    cache: dict[str, Any] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The three forgetting figures of ``tuned`` against ``base`` on general data:

    * ``forgetting/ppl_base``, ``forgetting/ppl``, ``forgetting/ppl_ratio``: perplexity of the
      held-out texts (every token after the first);
    * ``forgetting/kl_base_tuned``: KL(base || tuned) per token on the base's own greedy answers to
      the general prompts, sum(log p_base - log p_tuned) / tokens: how much of what the base would
      say the tuned model now finds unlikely;
    * ``forgetting/qa_base_correct``, ``forgetting/qa_retained``: of the short-answer questions the
      base answers correctly (:func:`answer_matches`), the share the tuned model still does.

    ``cache``: a dict that keeps the base's side (its text log-probs, greedy answers and QA
    answers) for the next call on the same base and data (eval.model=[...]: every model of the
    table against one base, which is then measured once).

    Returns (metrics, the QA rows the tuned model lost, for the report)."""
    qa_tokens = 24

    def gen(m, rows, n, desc):
        return generate(m, tokenizer, rows, max_new_tokens=n, batch_size=batch_size, device=device, desc=desc)

    b = cache if cache is not None else {}
    if not b:  # the base's side
        b["text"] = [
            (ids[:1], ids[1:])
            for ids in (tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts)
            if len(ids) >= 2
        ]
        with base.active() as m:
            b["lp_text"] = token_logps(
                m, b["text"], batch_size=batch_size, device=device, desc="general text base"
            )
            answers = [g for g in gen(m, prompts, max_new_tokens, "general base") if g.ids] if prompts else []
            qa_ans = gen(m, [r["prompt"] for r in qa], qa_tokens, "general QA base") if qa else []
        b["answers"] = [(g.prompt_ids, g.ids) for g in answers]
        b["lp_answers"] = [g.logprobs for g in answers]
        b["known"] = [
            (r, g.text) for r, g in zip(qa, qa_ans, strict=True) if answer_matches(r["answer"], g.text)
        ]
    out: dict[str, float] = {}
    known = b["known"]
    with tuned.active() as m:
        if texts:
            lp = token_logps(m, b["text"], batch_size=batch_size, device=device, desc="general text tuned")
            out["forgetting/ppl_base"] = perplexity(b["lp_text"])
            out["forgetting/ppl"] = perplexity(lp)
            out["forgetting/ppl_ratio"] = out["forgetting/ppl"] / out["forgetting/ppl_base"]
        if prompts:
            lp = token_logps(m, b["answers"], batch_size=batch_size, device=device, desc="general KL tuned")
            out["forgetting/kl_base_tuned"] = kl_metrics(b["lp_answers"], lp)["kl/token"]
        tuned_ans = gen(m, [r["prompt"] for r, _ in known], qa_tokens, "general QA tuned") if known else []
    lost: list[dict[str, Any]] = []
    if qa:
        out["forgetting/qa_base_accuracy"] = len(known) / len(qa)
        out["forgetting/qa_base_correct"] = float(len(known))
        kept = [answer_matches(r["answer"], g.text) for (r, _), g in zip(known, tuned_ans, strict=True)]
        out["forgetting/qa_retained"] = sum(kept) / len(kept) if kept else math.nan
        lost = [
            {"prompt": _show(r["prompt"]), "answer": r["answer"], "base": a, "tuned": g.text}
            for (r, a), g, k in zip(known, tuned_ans, kept, strict=True)
            if not k
        ]
    out["forgetting/flag"] = 1.0 if forgetting_verdict(out).startswith("FORGETTING") else 0.0
    return out, lost


def check_forgetting(
    cfg: Any, L: Loaded, cache: dict[str, Any] | None = None
) -> tuple[dict[str, float], dict | None]:
    """eval.forgetting on ``L.model`` against its base (:func:`forgetting_metrics`): (metrics, the
    report's section with the verdict); nothing where the check is off, the model is the base
    itself (eval.model=base: ratio 1, KL 0, every answer kept by definition) or no base is in
    memory. The verdict also goes to stderr."""
    e = cfg.eval
    if not e.get("forgetting", True) or int(e.get("max_general", 0)) <= 0:
        return {}, None
    if L.kl_ref is None:
        why = "it is the base itself" if L.info.get("kind") == "base" else "no base model in memory"
        log.info("forgetting check skipped for %s: %s", L.info.get("spec"), why)
        return {}, None
    base = L.kl_ref
    t0 = time.time()
    texts, prompts, qa, info = general_rows(cfg)
    with L.precision():
        m, lost = forgetting_metrics(
            base,
            L.model,
            L.tokenizer,
            texts,
            prompts,
            qa,
            max_length=int(L.cfg.model.max_length),
            max_new_tokens=int(e.general_new_tokens),
            batch_size=int(e.batch_size),
            device=L.device,
            cache=cache,
        )
    section = {
        "verdict": forgetting_verdict(m),
        "data": info,
        "lost": lost[: int(e.samples_to_log)],
        "time_s": round(time.time() - t0, 1),
    }
    print(f"align: forgetting ({L.info.get('spec')}): {section['verdict']}", file=sys.stderr, flush=True)
    return m, section


# --------------------------------------------------------------------------- the report


def _pair_logps(
    L: Loaded, subject: Subject, ids: list[tuple[list[int], list[int]]], batch_size: int
) -> list[float]:
    with subject.active() as m, L.precision():
        return [
            sum(x)
            for x in token_logps(
                m, ids, batch_size=batch_size, device=L.device, desc=f"pairs {subject.label}"
            )
        ]


def model_specs(value: Any) -> list[str]:
    """``eval.model`` as a list of specs: one string, or a list (``eval.model=[base,<a>,<b>]``)."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return [str(value)]
    return [str(v) for v in value]


def _generate_for(s: Subject, L: Loaded, prompts: list[dict], cfg: Any, desc: str) -> list[Generation]:
    """``s``'s completions of ``prompts`` with the eval.* sampling settings (seeded)."""
    import torch

    e = cfg.eval
    torch.manual_seed(cfg.seed)
    with s.active() as m, L.precision():
        return generate(
            m,
            L.tokenizer,
            [r["prompt"] for r in prompts],
            max_new_tokens=e.max_new_tokens,
            batch_size=int(e.batch_size),
            temperature=e.temperature,
            top_p=e.top_p,
            device=L.device,
            desc=desc,
        )


def _kl_to_base(L: Loaded, gens: list[Generation], bs: int) -> dict[str, float]:
    """KL of ``L.model`` to its base on the model's own completions (0 for the base itself)."""
    if L.kl_ref is None:
        return {"kl/token": 0.0, "kl/sequence": 0.0}
    seqs = [(g.prompt_ids, g.ids) for g in gens if g.ids]
    lp_model = [g.logprobs for g in gens if g.ids]
    if any(lp is None for lp in lp_model):  # sampled, not greedy: no log-probs from decoding
        with L.model.active() as m, L.precision():
            lp_model = token_logps(m, seqs, batch_size=bs, device=L.device)
    with L.kl_ref.active() as m, L.precision():
        lp_ref = token_logps(m, seqs, batch_size=bs, device=L.device)
    return kl_metrics(lp_model, lp_ref)


def _pair_ids(L: Loaded, pairs: list[dict]) -> tuple[list, list]:
    max_len = int(L.cfg.model.max_length)
    chosen = [pair_token_ids(L.tokenizer, p["prompt"], p["chosen"], max_len) for p in pairs]
    rejected = [pair_token_ids(L.tokenizer, p["prompt"], p["rejected"], max_len) for p in pairs]
    return chosen, rejected


def _dpo_reward(
    L: Loaded, model_logps: tuple[list[float], list[float]], ref_logps: tuple[list[float], list[float]]
) -> dict[str, float]:
    """A DPO run's implicit-reward accuracy and margin against its reference."""
    pc, pr = model_logps
    rc = [L.dpo_beta * (a - b) for a, b in zip(pc, ref_logps[0], strict=True)]
    rr = [L.dpo_beta * (a - b) for a, b in zip(pr, ref_logps[1], strict=True)]
    m = preference_metrics(rc, rr, prefix="dpo/reward")
    return {
        "dpo/reward_accuracy": m["dpo/reward/accuracy"],
        "dpo/reward_margin": m["dpo/reward/margin"],
        "dpo/beta": L.dpo_beta,
    }


def run(
    cfg: Any, out_dir: str | Path, tracker: Any = None, *, model_spec: str | None = None
) -> dict[str, Any]:
    """Evaluate ``model_spec`` (default ``eval.model``); write eval.json and report.md into
    ``out_dir``; log to ``tracker``. Returns the eval.json content (``metrics`` flat).

    ``eval.model`` naming several models is :func:`run_many`'s side-by-side table."""
    e = cfg.eval
    specs = [model_spec] if model_spec else model_specs(e.model)
    if len(specs) > 1:
        return run_many(cfg, out_dir, tracker, specs)
    spec = specs[0]
    out_dir = Path(out_dir)
    started = time.time()
    prompts, pairs, data_info = held_out_rows(cfg)
    L = load(cfg, spec)
    subjects = [L.model] + ([L.baseline] if L.baseline else [])
    max_len = int(L.cfg.model.max_length)
    bs = int(e.batch_size)
    results: dict[str, dict[str, float]] = {s.label: {} for s in subjects}
    per_type: dict[str, dict] = {}
    gens: dict[str, list[Generation]] = {}
    timing: dict[str, float] = {}

    if prompts:
        constraints = [r.get("constraints", "[]") for r in prompts]
        for s in subjects:
            t0 = time.time()
            gens[s.label] = _generate_for(s, L, prompts, cfg, desc=f"eval {s.label}")
            timing[f"time/generate_{s.label}_s"] = round(time.time() - t0, 1)
            texts = [g.text for g in gens[s.label]]
            m_if, per_type[s.label] = ifeval_metrics(constraints, texts)
            results[s.label] |= m_if | length_metrics(gens[s.label])
        # KL to the base on the model's own completions
        t0 = time.time()
        results["model"] |= _kl_to_base(L, gens["model"], bs)
        if L.baseline is not None:
            results["baseline"] |= {"kl/token": 0.0, "kl/sequence": 0.0}
        timing["time/kl_s"] = round(time.time() - t0, 1)
        # reward model, and the win-rate against the baseline
        scores: dict[str, list[float]] = {}
        if e.reward:
            from align.rewards import RewardModel

            t0 = time.time()
            rm = RewardModel(e.reward, L.cfg, key="eval.reward", batch_size=bs or 8)
            for s in subjects:
                scores[s.label] = rm([r["prompt"] for r in prompts], [g.text for g in gens[s.label]])
                results[s.label]["rm/score"] = sum(scores[s.label]) / len(scores[s.label])
            del rm
            timing["time/reward_s"] = round(time.time() - t0, 1)
        if L.baseline is not None:
            judged = {
                s.label: [judges.score(c, g.text) for c, g in zip(constraints, gens[s.label], strict=True)]
                for s in subjects
            }
            results["model"]["win_rate/judge"] = win_rate(judged["model"], judged["baseline"])
            if scores:
                results["model"]["win_rate/rm"] = win_rate(scores["model"], scores["baseline"])

    if pairs:
        t0 = time.time()
        chosen, rejected = _pair_ids(L, pairs)
        logps: dict[str, tuple[list[float], list[float]]] = {}
        for s in subjects:
            logps[s.label] = (_pair_logps(L, s, chosen, bs), _pair_logps(L, s, rejected, bs))
            results[s.label] |= preference_metrics(*logps[s.label])
        if L.dpo_ref is not None and L.dpo_beta is not None:
            ref = logps.get(L.dpo_ref.label) if L.dpo_ref.label in logps else None
            if ref is None:
                ref = (
                    _pair_logps(L, L.dpo_ref, chosen, bs),
                    _pair_logps(L, L.dpo_ref, rejected, bs),
                )
            results["model"] |= _dpo_reward(L, logps["model"], ref)
        timing["time/pairs_s"] = round(time.time() - t0, 1)

    fm, forgetting = check_forgetting(cfg, L)
    results["model"] |= fm
    if forgetting:
        timing["time/forgetting_s"] = forgetting["time_s"]

    delta = {}
    if L.baseline is not None:
        delta = {
            k: results["model"][k] - results["baseline"][k]
            for k in results["model"]
            if k in results["baseline"]
            and not k.endswith(("/prompts", "/instructions", "/pairs"))
            and not k.startswith("forgetting/")
        }
    timing["time/eval_s"] = round(time.time() - started, 1)
    samples = _samples(prompts, gens, int(e.samples_to_log))
    report = {
        "format": "align-eval/1",
        "model": L.info,
        "baseline": "base" if L.baseline is not None else None,
        "settings": _settings(cfg, max_len),
        "data": data_info,
        "metrics": {"model": results["model"], "baseline": results.get("baseline"), "delta": delta or None},
        "per_type": {"model": per_type.get("model", {}), "baseline": per_type.get("baseline")},
        "samples": samples,
        "forgetting": forgetting,
        "time": timing,
    }
    report["flat"] = flat_metrics(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    from align.artifacts import write_json_atomic, write_text_atomic

    chart = _chart(
        out_dir,
        {"base": per_type.get("baseline") or {}, "model": per_type.get("model") or {}},
        f"eval.model={spec}",
        len(prompts),
    )
    report["chart"] = chart.name if chart else None
    write_json_atomic(out_dir / EVAL_JSON, report)
    write_text_atomic(out_dir / REPORT_MD, report_markdown(report))
    if tracker is not None:
        tracker.log(report["flat"])
        tracker.summary(report["flat"])
        if samples:
            cols = ["id", "prompt", "constraints", "baseline", "baseline_pass", "model", "model_pass"]
            tracker.table("eval/samples", cols, [[s.get(c) for c in cols] for s in samples])
        if chart:
            tracker.image("eval/per_type_chart", chart)
    return report


def _settings(cfg: Any, max_len: int) -> dict[str, Any]:
    e = cfg.eval
    return {
        k: (v if not hasattr(v, "value") else v.value)
        for k, v in {
            "max_prompts": e.max_prompts,
            "max_pairs": e.max_pairs,
            "max_new_tokens": e.max_new_tokens,
            "batch_size": e.batch_size,
            "temperature": e.temperature,
            "top_p": e.top_p,
            "reward": e.reward,
            "seed": cfg.seed,
            "max_length": max_len,
        }.items()
    }


def _chart(out_dir: Path, per_type: dict[str, dict], title: str, n_prompts: int) -> Path | None:
    """eval.png: per-instruction-type accuracy of each model next to the base (None: no
    prompts were judged, or drawing failed, which is one warning line)."""
    from align import plots

    shown = {k: v for k, v in per_type.items() if v}
    if not shown:
        return None
    return plots.safely(
        plots.EVAL_PNG, lambda: plots.per_type_chart(shown, out_dir / plots.EVAL_PNG, title, n_prompts)
    )


# --------------------------------------------------------------------------- several models, one table

Z95 = 1.96  # two-sided 95% normal quantile


def noise_band(p_a: float, p_b: float, n: int) -> float:
    """Half-width of the 95% band of a difference of two accuracies measured on ``n`` items
    each: ``1.96 * sqrt(p_a (1 - p_a) / n + p_b (1 - p_b) / n)``, the standard error of a
    difference of two independent proportions. The models answer the same prompts, so the
    paired error (:func:`paired_band`) is usually smaller: this is the conservative band."""
    if not n or any(math.isnan(x) for x in (p_a, p_b)):
        return math.nan
    return Z95 * math.sqrt((p_a * (1 - p_a) + p_b * (1 - p_b)) / n)


def paired_band(a: list[float], b: list[float]) -> float:
    """Half-width of the 95% band of ``mean(a) - mean(b)`` from per-item outcomes of two models
    on the same items: ``1.96 * sd(a_i - b_i) / sqrt(n)`` (sample sd, n - 1)."""
    n = len(a)
    if n < 2:
        return math.nan
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return Z95 * math.sqrt(var / n)


def worst_case_band(n: int) -> float:
    """:func:`noise_band` at its largest (both accuracies 50%): ``1.96 * sqrt(0.5 / n)``."""
    return Z95 * math.sqrt(0.5 / n) if n else math.nan


def _unique_label(spec: str, info: dict[str, Any], taken: set[str]) -> str:
    if spec == "base":
        label = "base"
    elif info.get("kind") == "run":
        label = f"{info.get('stage')}:{Path(spec).name}"
    else:
        label = Path(spec).name or spec
    out, i = label, 2
    while out in taken:
        out, i = f"{label}#{i}", i + 1
    taken.add(out)
    return out


def run_many(cfg: Any, out_dir: str | Path, tracker: Any, specs: list[str]) -> dict[str, Any]:
    """``eval.model=[base,<run a>,<run b>,...]``: every model on the same held-out prompts and
    pairs, one at a time (each loaded once, then freed), into one side-by-side table: one row
    per model, its difference to the base row with the 95% noise band for that many prompts.
    With ``eval.baseline=base`` the base gets a row even when the list does not name it.
    Writes eval.json (``format: align-eval-models/1``), report.md and eval.png."""
    import gc

    from omegaconf import open_dict

    from align import backbone

    e = cfg.eval
    out_dir = Path(out_dir)
    started = time.time()
    if e.baseline == "base" and "base" not in specs:
        specs = ["base", *specs]
    one = copy.deepcopy(cfg)  # each model alone: the base is a row of its own, not a second copy
    with open_dict(one):
        one.eval.baseline = "none"
    prompts, pairs, data_info = held_out_rows(cfg)
    constraints = [r.get("constraints", "[]") for r in prompts]
    bs = int(e.batch_size)
    rows: list[dict[str, Any]] = []
    taken: set[str] = set()
    base_sides: dict[str, dict] = {}  # the forgetting check's base side, per base model: measured once
    max_len = int(cfg.model.max_length)
    for spec in specs:
        t0 = time.time()
        L = load(one, spec)
        label = _unique_label(spec, L.info, taken)
        row: dict[str, Any] = {"label": label, "spec": spec, "model": L.info, "metrics": {}, "per_type": {}}
        m = row["metrics"]
        if prompts:
            gens = _generate_for(L.model, L, prompts, cfg, desc=f"eval {label}")
            row["texts"] = [g.text for g in gens]
            m_if, row["per_type"] = ifeval_metrics(constraints, row["texts"])
            m |= m_if | length_metrics(gens)
            row["passed"] = [
                float(judges.judge(c, t)) for c, t in zip(constraints, row["texts"], strict=True)
            ]
            row["judged"] = [judges.score(c, t) for c, t in zip(constraints, row["texts"], strict=True)]
            if L.info.get("kind") == "model":  # a full model: no base in memory to measure KL against
                m |= {"kl/token": math.nan, "kl/sequence": math.nan}
            else:
                m |= _kl_to_base(L, gens, bs)
            row["prompts_for_rm"] = [r["prompt"] for r in prompts]
            del gens
        if pairs:
            chosen, rejected = _pair_ids(L, pairs)
            lp = (_pair_logps(L, L.model, chosen, bs), _pair_logps(L, L.model, rejected, bs))
            m |= preference_metrics(*lp)
            row["pair_wins"] = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(*lp, strict=True)]
            if L.dpo_ref is not None and L.dpo_beta is not None:
                ref = (
                    _pair_logps(L, L.dpo_ref, chosen, bs),
                    _pair_logps(L, L.dpo_ref, rejected, bs),
                )
                m |= _dpo_reward(L, lp, ref)
        fm, row["forgetting"] = check_forgetting(
            cfg, L, cache=base_sides.setdefault(L.info["base_model"], {})
        )
        m |= fm
        max_len = int(L.cfg.model.max_length)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        del L
        gc.collect()
        backbone.release_host_memory()
    if prompts and e.reward:  # one reward model scores every row's completions
        from align.rewards import RewardModel

        rm = RewardModel(e.reward, cfg, key="eval.reward", batch_size=bs or 8)
        for row in rows:
            row["rm_scores"] = rm(row["prompts_for_rm"], row["texts"])
            row["metrics"]["rm/score"] = sum(row["rm_scores"]) / len(row["rm_scores"])
        del rm
    base = next((r for r in rows if r["spec"] == "base"), None)
    for row in rows:
        row["vs_base"] = _versus(row, base, len(prompts), len(pairs)) if base and row is not base else None
    report = _many_report(cfg, rows, base, prompts, pairs, data_info, max_len, started)
    out_dir.mkdir(parents=True, exist_ok=True)
    from align.artifacts import write_json_atomic, write_text_atomic

    chart = _chart(out_dir, {r["label"]: r["per_type"] for r in rows}, f"{len(rows)} models", len(prompts))
    report["chart"] = chart.name if chart else None
    write_json_atomic(out_dir / EVAL_JSON, report)
    write_text_atomic(out_dir / REPORT_MD, many_markdown(report))
    if tracker is not None:
        tracker.log(report["flat"])
        tracker.summary(report["flat"])
        cols, table = models_table(report)
        tracker.table("eval/models", cols, table)
        if chart:
            tracker.image("eval/per_type_chart", chart)
    return report


def _versus(row: dict, base: dict, n_prompts: int, n_pairs: int) -> dict[str, float]:
    """The row's differences to the base row, with their 95% bands (unpaired and paired)."""
    m, b = row["metrics"], base["metrics"]
    out: dict[str, float] = {}
    for key, n, a_items, b_items in (
        ("ifeval/prompt_accuracy", n_prompts, row.get("passed"), base.get("passed")),
        ("pref/accuracy", n_pairs, row.get("pair_wins"), base.get("pair_wins")),
    ):
        if key in m and key in b:
            out[f"delta/{key}"] = m[key] - b[key]
            out[f"band/{key}"] = noise_band(m[key], b[key], n)
            out[f"paired_band/{key}"] = paired_band(a_items, b_items) if a_items else math.nan
    if "ifeval/instruction_accuracy" in m and "ifeval/instruction_accuracy" in b:
        out["delta/ifeval/instruction_accuracy"] = (
            m["ifeval/instruction_accuracy"] - b["ifeval/instruction_accuracy"]
        )
    if row.get("judged") and base.get("judged"):
        out["win_rate/judge"] = win_rate(row["judged"], base["judged"])
    if row.get("rm_scores") and base.get("rm_scores"):
        out["win_rate/rm"] = win_rate(row["rm_scores"], base["rm_scores"])
    return out


def _many_report(cfg, rows, base, prompts, pairs, data_info, max_len, started) -> dict[str, Any]:
    n_samples = min(int(cfg.eval.samples_to_log), len(prompts))
    samples = []
    for i, row in enumerate(prompts[:n_samples]):
        s: dict[str, Any] = {
            "id": row.get("id", str(i)),
            "prompt": _show(row["prompt"]),
            "constraints": json.dumps(judges.parse_constraints(row.get("constraints", "[]"))),
            "outputs": {r["label"]: {"text": r["texts"][i], "pass": bool(r["passed"][i])} for r in rows},
        }
        samples.append(s)
    report: dict[str, Any] = {
        "format": "align-eval-models/1",
        "models": [
            {
                "label": r["label"],
                "spec": r["spec"],
                "model": r["model"],
                "metrics": r["metrics"],
                "vs_base": r["vs_base"],
                "per_type": r["per_type"],
                "forgetting": r["forgetting"],
                "time_s": r["seconds"],
                # per-item outcomes, in the order of the held-out rows: paired comparisons between
                # any two rows (examples/results_table.py compares each method with its SFT start)
                "passed": r.get("passed"),
                "pair_wins": r.get("pair_wins"),
            }
            for r in rows
        ],
        "baseline": base["label"] if base else None,
        "noise": {
            "prompts": len(prompts),
            "pairs": len(pairs),
            "band_formula": "1.96 * sqrt(p_a (1 - p_a) / n + p_b (1 - p_b) / n): 95% band of a difference "
            "of two independent proportions on n items (conservative for the same prompts)",
            "paired_band_formula": "1.96 * sd(a_i - b_i) / sqrt(n): the same prompts, outcome by outcome",
            "worst_case_prompts": worst_case_band(len(prompts)) if prompts else None,
            "worst_case_pairs": worst_case_band(len(pairs)) if pairs else None,
        },
        "settings": _settings(cfg, max_len) | {"baseline": cfg.eval.baseline},
        "data": data_info,
        "samples": samples,
        "time": {"time/eval_s": round(time.time() - started, 1)},
    }
    flat: dict[str, float] = {}
    for r in report["models"]:
        for k, v in r["metrics"].items():
            flat[f"eval/{r['label']}/{k}"] = float(v)
        for k, v in (r["vs_base"] or {}).items():
            flat[f"eval/{r['label']}/{k}"] = float(v)
        for kind, d in r["per_type"].items():
            flat[f"eval/{r['label']}/ifeval/type/{kind}"] = float(d["instruction_accuracy"])
    report["flat"] = flat | report["time"]
    return report


MODEL_COLUMNS = [
    ("ifeval/prompt_accuracy", "instr. acc. (prompt)"),
    ("ifeval/instruction_accuracy", "instr. acc. (instr.)"),
    ("pref/accuracy", "pref. acc."),
    ("dpo/reward_accuracy", "DPO reward acc."),
    ("rm/score", "RM score"),
    ("kl/token", "KL/token"),
    ("length/tokens", "length (tokens)"),
]


def models_table(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The side-by-side table as columns and rows (one row per model), for W&B and report.md."""
    models = report["models"]
    keys = [(k, name) for k, name in MODEL_COLUMNS if any(k in r["metrics"] for r in models)]
    cols = ["model", "spec"] + [name for _, name in keys]
    has_base = report["baseline"] is not None
    if has_base:
        cols += ["prompt acc. vs base (pts)", "±95% (pts)", "win-rate vs base (judge)"]
    rows = []
    for r in models:
        row: list[Any] = [r["label"], r["spec"]] + [r["metrics"].get(k) for k, _ in keys]
        if has_base:
            v = r["vs_base"] or {}
            d, band = v.get("delta/ifeval/prompt_accuracy"), v.get("band/ifeval/prompt_accuracy")
            row += [
                None if d is None else round(100 * d, 1),
                None if band is None else round(100 * band, 1),
                v.get("win_rate/judge"),
            ]
        rows.append(row)
    return cols, rows


def many_markdown(report: dict[str, Any]) -> str:
    noise = report["noise"]
    models = report["models"]
    lines = [
        f"# Alignment report: {len(models)} models side by side",
        "",
        f"- held-out data: {report['data'].get('prompt_rows')} prompts ({report['data'].get('prompts')}), "
        f"{report['data'].get('pair_rows')} pairs ({report['data'].get('pairs')}), the same for every model",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()),
        "- precision (train.autocast of each run): "
        + ", ".join(f"{r['label']}: {r['model'].get('precision', 'not recorded')}" for r in models),
        f"- time: {report['time'].get('time/eval_s')} s",
        "",
        "## Models",
        "",
    ]
    cols, _ = models_table(report)
    keys = [k for k, name in MODEL_COLUMNS if name in cols]
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
    for r in models:
        cells = [r["label"], f"`{r['spec']}`"]
        cells += [_fmt(r["metrics"].get(k), any(p in k for p in PCT)) for k in keys]
        if report["baseline"] is not None:
            v = r["vs_base"]
            if v is None:
                cells += ["(base)", "", ""]
            else:
                d = v.get("delta/ifeval/prompt_accuracy")
                band = v.get("band/ifeval/prompt_accuracy")
                cells += [
                    "-" if d is None else f"{100 * d:+.1f}",
                    "-" if band is None or math.isnan(band) else f"±{100 * band:.1f}",
                    _fmt(v.get("win_rate/judge"), True),
                ]
        lines.append("| " + " | ".join(cells) + " |")
    if noise["prompts"]:
        lines += [
            "",
            f"Noise: with {noise['prompts']} prompts one prompt is {100 / noise['prompts']:.1f} points. "
            "The ±95% column is 1.96 × sqrt(p_a(1−p_a)/n + p_b(1−p_b)/n), the standard error of a "
            "difference of two independent proportions on n prompts (p_a, p_b: the two prompt-level "
            "accuracies); a difference inside it is noise. It is conservative for models answering the "
            "same prompts: eval.json also gives the paired band, 1.96 × sd(a_i − b_i)/sqrt(n). At worst "
            f"(both at 50%) the band is ±{100 * noise['worst_case_prompts']:.1f} points.",
        ]
    if report.get("chart"):
        lines += ["", "## Per instruction type", "", f"![per-instruction-type accuracy]({report['chart']})"]
    types = sorted({k for r in models for k in r["per_type"]})
    if types:
        if not report.get("chart"):
            lines += ["", "## Per instruction type"]
        lines += [
            "",
            "Strict instruction-level accuracy; n = instructions of that type.",
            "",
            "| type | n | " + " | ".join(r["label"] for r in models) + " |",
            "|---|---:|" + "---:|" * len(models),
        ]
        for kind in types:
            n = max(r["per_type"].get(kind, {}).get("instructions", 0) for r in models)
            accs = [_fmt(r["per_type"].get(kind, {}).get("instruction_accuracy"), True) for r in models]
            lines.append(f"| {kind} | {n} | " + " | ".join(accs) + " |")
    checked = [r for r in models if r.get("forgetting")]
    if checked:
        lines += ["", FORGETTING_TITLE, "", "| model | general-text perplexity (base -> model) | "]
        lines[-1] += "KL(base \\|\\| model) per token | known short answers kept | verdict |"
        lines.append("|---|---:|---:|---:|---|")
        for r in checked:
            m = r["metrics"]
            lines.append(
                f"| {r['label']} | {_fmt(m.get('forgetting/ppl_base'))} -> {_fmt(m.get('forgetting/ppl'))} | "
                f"{_fmt(m.get('forgetting/kl_base_tuned'))} | {_fmt(m.get('forgetting/qa_retained'), True)} of "
                f"{_fmt(m.get('forgetting/qa_base_correct'))} | {r['forgetting']['verdict']} |"
            )
    if report["samples"]:
        lines += ["", "## Samples", ""]
        for s in report["samples"]:
            lines += [f"### {s['id']}", "", "**Prompt:** " + s["prompt"].replace("\n", " "), ""]
            lines += [f"**Constraints:** `{s['constraints']}`", ""]
            for label, o in s["outputs"].items():
                body = "\n".join("> " + x for x in (o["text"] or "(empty)").splitlines())
                lines += [f"**{label}** ({'PASS' if o['pass'] else 'FAIL'}):", "", body, ""]
    return "\n".join(lines) + "\n"


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``eval/<key>`` (the model), ``eval/base/<key>``, ``eval/delta/<key>``, per-type
    ``eval/ifeval/type/<type>`` (instruction-level) and ``time/...``: for W&B and metrics.json."""
    out: dict[str, float] = {}
    m = report["metrics"]
    for prefix, part in (("eval/", m["model"]), ("eval/base/", m["baseline"]), ("eval/delta/", m["delta"])):
        for k, v in (part or {}).items():
            out[prefix + k] = float(v)
    for prefix, part in (
        ("eval/", report["per_type"]["model"]),
        ("eval/base/", report["per_type"]["baseline"]),
    ):
        for kind, d in (part or {}).items():
            out[f"{prefix}ifeval/type/{kind}"] = float(d["instruction_accuracy"])
    out |= {k: float(v) for k, v in report["time"].items()}
    return out


def _show(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt if m.get("role") == "user") or json.dumps(
        prompt
    )


def _samples(prompts: list[dict], gens: dict[str, list[Generation]], n: int) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(prompts[:n]):
        cons = row.get("constraints", "[]")
        s: dict[str, Any] = {
            "id": row.get("id", str(i)),
            "prompt": _show(row["prompt"]),
            "constraints": json.dumps(judges.parse_constraints(cons)),
        }
        for label in ("baseline", "model"):
            if label in gens:
                s[label] = gens[label][i].text
                s[f"{label}_pass"] = judges.judge(cons, gens[label][i].text)
        out.append(s)
    return out


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    if float(v).is_integer() and abs(v) >= 1:
        return f"{v:.0f}"
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"


PCT = ("accuracy", "win_rate", "truncated")


def report_markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    model, base, delta = m["model"], m["baseline"] or {}, m["delta"] or {}
    info = report["model"]
    lines = [
        f"# Alignment report: {info.get('spec')}",
        "",
        f"- model: `{info.get('spec')}` ({info.get('kind')}{', stage=' + info['stage'] if info.get('stage') else ''})",
        f"- base model: `{info.get('base_model')}`",
        f"- baseline: {'the base model (adapters disabled)' if report['baseline'] else 'none'}",
        f"- precision: {info.get('precision', 'not recorded')} (train.autocast)",
        f"- held-out data: {report['data'].get('prompt_rows')} prompts ({report['data'].get('prompts')}), "
        f"{report['data'].get('pair_rows')} pairs ({report['data'].get('pairs')})",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()),
        f"- time: {report['time'].get('time/eval_s')} s",
        "",
        "## Metrics",
        "",
    ]
    keys = [k for k in HEADLINE if k in model] + sorted(
        k for k in model if k not in HEADLINE and not k.startswith("ifeval/type")
    )
    if base:
        lines += ["| metric | baseline | model | difference |", "|---|---:|---:|---:|"]
        for k in keys:
            pct = any(p in k for p in PCT)
            d = delta.get(k)
            dtext = "-" if d is None else (f"{100 * d:+.1f} pts" if pct else f"{d:+.3f}")
            lines.append(f"| {k} | {_fmt(base.get(k), pct)} | {_fmt(model[k], pct)} | {dtext} |")
    else:
        lines += ["| metric | model |", "|---|---:|"]
        for k in keys:
            lines.append(f"| {k} | {_fmt(model[k], any(p in k for p in PCT))} |")
    fg = report.get("forgetting")
    if fg:
        lines += ["", FORGETTING_TITLE, "", f"**{fg['verdict']}**", ""]
        lines += ["| figure | base | model |", "|---|---:|---:|"]
        lines.append(
            f"| perplexity, held-out general text ({fg['data']['texts']} texts) | "
            f"{_fmt(model.get('forgetting/ppl_base'))} | {_fmt(model.get('forgetting/ppl'))} |"
        )
        lines.append(
            f"| KL(base \\|\\| model) per token, base's greedy answers ({fg['data']['prompts']} prompts) | 0 | "
            f"{_fmt(model.get('forgetting/kl_base_tuned'))} |"
        )
        lines.append(
            f"| short answers the base gets right ({_fmt(model.get('forgetting/qa_base_correct'))} of "
            f"{fg['data']['qa']}): still right | 100.0% | {_fmt(model.get('forgetting/qa_retained'), True)} |"
        )
        for x in fg.get("lost") or []:
            lines.append(f"- lost: {x['prompt']!r} -> expected {x['answer']!r}, model said {x['tuned']!r}")
    pt_model = report["per_type"]["model"] or {}
    pt_base = report["per_type"]["baseline"] or {}
    if pt_model:
        lines += ["", "## Per instruction type (strict, instruction-level)", ""]
        if report.get("chart"):
            lines += [f"![per-instruction-type accuracy]({report['chart']})", ""]
        if pt_base:
            lines += ["| type | instructions | baseline | model |", "|---|---:|---:|---:|"]
        else:
            lines += ["| type | instructions | model |", "|---|---:|---:|"]
        for kind, d in pt_model.items():
            row = f"| {kind} | {d['instructions']} | "
            if pt_base:
                row += f"{_fmt(pt_base.get(kind, {}).get('instruction_accuracy'), True)} | "
            lines.append(row + f"{_fmt(d['instruction_accuracy'], True)} |")
    if report["samples"]:
        lines += ["", "## Samples", ""]
        for s in report["samples"]:
            lines += [
                f"### {s['id']}",
                "",
                "**Prompt:** " + s["prompt"].replace("\n", " "),
                "",
                f"**Constraints:** `{s['constraints']}`",
                "",
            ]
            for label in ("baseline", "model"):
                if label in s:
                    verdict = "PASS" if s[f"{label}_pass"] else "FAIL"
                    body = "\n".join("> " + x for x in (s[label] or "(empty)").splitlines())
                    lines += [f"**{label}** ({verdict}):", "", body, ""]
    return "\n".join(lines) + "\n"
