"""PPO against a peer: TRL 1.12's ``trl.experimental.ppo`` on align's stage=ppo setup (issue 11).

Same SFT start, same reward (align's ``judge:ifeval``), same budget (prompts x new tokens x
updates) and hyper-parameters as ``python -m align stage=ppo ppo.policy=<sft run>
ppo.reward=judge:ifeval``; it reports seconds per PPO step, peak RSS (net of the RSS after
imports), KL per token, the training score, and saves the trained policy merged into a plain
model directory that align's eval scores like any other model:

    python3 bench/trl_ppo.py --setup                       # once: the scratch venv /tmp/trl112
    nice -n 19 /tmp/trl112/bin/python bench/trl_ppo.py \\
        --sft /tmp/runs/outputs/sft/2026-11-29_15-56-23 --out /tmp/trl_ppo/model
    /work/main/.venv/bin/python -m align stage=eval eval.model=/tmp/trl_ppo/model \\
        eval.max_prompts=200 eval.baseline=none eval.max_pairs=0   # as docs/ppo.md's sweep

Smoke test (2 steps of 4 prompts, 16 new tokens): ``--steps 2 --batch-size 2 --max-new-tokens 16``.
The last line is ``trl_ppo: s/step=... peak_rss_mb=... kl_per_token=... score_last4=...``;
every step's metrics go to ``--metrics`` (JSON).

This script runs ONLY in a scratch venv with trl==1.12.* (the last TRL with PPO; 1.13 removed
it): TRL 1.12 is never a dependency of align. ``--setup`` makes it::

    python3 -m venv /tmp/trl112
    /tmp/trl112/bin/pip install torch==2.13.0            # the CPU wheel on local disk; keep the pin
    /tmp/trl112/bin/pip install "trl==1.12.*" transformers==5.24.0 peft==0.21.2 accelerate==1.15.0

(checked 2026-11-30: trl 1.12.0 with transformers 5.24.0, peft 0.21.2, accelerate 1.15.0,
datasets 5.2.0, torch 2.13.0+cpu: align's own versions). align is not installed there: this
file puts the repository on ``sys.path`` and uses the parts of align that import without
hydra/omegaconf (``align.data``, ``align.judges`` via ``align.rl.rollout``, ``align.sampling``,
``align.malloc``, ``align.hardware``, ``align.cache``). The base model is align's embedded
SmolLM2-135M-Instruct as converted to safetensors in align's cache
(``~/.cache/align/models/smollm2-135m-0.1.2``; any align stage run once in align's venv makes it).

How align's setup maps onto TRL 1.12's PPOTrainer
-------------------------------------------------
* **Policy and reference.** align's ``ppo.policy=<sft run>`` trains the SFT LoRA itself
  (adapter ``default``, starting at the SFT weights) and keeps a frozen copy as adapter ``ref``.
  TRL 1.12 supports exactly that layout: a ``PeftModel`` with two adapters and
  ``PPOConfig(model_adapter_name="default", ref_adapter_name="ref")`` (its ``null_ref_context``
  switches to ``ref`` for the reference pass). So the policy here is the base + the SFT LoRA
  (trainable) and the reference the base + the same SFT LoRA (frozen): the same start, the same
  trainable parameters (r=16, alpha=32 on q/k/v/o/gate/up/down; dropout 0, as TRL and align both
  switch dropout off). Merging the SFT adapter into the base and putting a fresh LoRA on it
  (``peft_config``, reference = adapters disabled) would also start from the SFT policy, but
  trains a different parameterisation (a zero-initialised B); not used.
* **Value model.** TRL needs a sequence-classification model: the base SmolLM2 as
  ``AutoModelForSequenceClassification(num_labels=1)``, fully trainable (TRL's layout: a separate
  full model, 135M parameters + their AdamW moments). align's value is a LoRA adapter on the
  shared base + a Linear(hidden, 1) head. Both heads start at zero (align's ``ScalarHead`` without
  a reward model to copy; ``--value-head random`` keeps transformers' N(0, 0.02) init, TRL's default).
* **Reward.** TRL 1.12 needs a reward *model*: ``get_reward()`` calls
  ``getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=..., ...)`` and reads
  ``model.score(hidden_states[-1])`` at the last non-pad position. :class:`JudgeReward` is that
  module: its "backbone" takes each row's real tokens, finds the prompt they start with (the
  rendered prompts of the run, by token ids), decodes the rest as align's rollout does
  (``skip_special_tokens=True``, EOS included then dropped), calls the same judge align's PPO calls
  (``align.rl.rollout.reward_function("judge:ifeval")`` with the row's ``constraints`` and other
  columns) and returns the score at every position, so TRL reads it wherever it reads.
  TRL subtracts ``missing_eos_penalty`` itself, as align does.
* **Pad token.** SmolLM2's pad token is its EOS ``<|im_end|>``, which is also in every chat
  prompt; TRL masks every pad-id token (``attention_mask = ids != pad_token_id``), so it would
  drop the prompt's ``<|im_end|>`` tokens and the EOS. TRL is given ``<|endoftext|>`` (id 0,
  never in a prompt) as pad instead; EOS stays ``<|im_end|>`` (``stop_token="eos"``). The saved
  model keeps the original tokenizer and generation config.
* **Prompts.** The rows align reads (``align.data.load``: the shuffled first
  ``steps x prompts`` rows of reward_data/prompts_train.jsonl that fit model.max_length=256, then
  those whose prompt leaves room for max_new_tokens) in align's order
  (``PPOTrainer.prompt_stream``: one ``random.Random(seed)`` shuffle, ``prompts`` at a time).
  TRL's own dataloader reshuffles (``shuffle=True``); it is replaced by one that keeps that order.
* **Batch mapping.** align: 16 prompts a step = ``train.batch_size=8 x ppo.num_mini_batches=2``,
  2 epochs, one micro-batch per minibatch: 4 optimizer steps a PPO step. TRL:
  ``per_device_train_batch_size=16, gradient_accumulation_steps=1, num_mini_batches=2`` gives
  the same (TRL's rollout is ``per_device_train_batch_size x gradient_accumulation_steps``; with
  grad-accum 2 its accelerator would step the optimizer only every second minibatch).
  ``local_rollout_forward_batch_size`` = 16 (``--rollout-batch``): all prompts sampled in one
  batch as align does (align's forward passes run 8 at a time, TRL's 16).
* **Precision.** fp32 weights; where align would use bf16 autocast (``train.autocast=auto``:
  a CPU with native bf16, ``align.hardware.cpu_computes_bf16``), the whole ``trainer.train()``
  runs under ``torch.autocast("cpu", bfloat16)``: sampling, reference, value, scoring and update,
  as align's PPO does. (TRL's own Accelerator is built without mixed precision.)
* **Gradient checkpointing** on the policy and the value model (stage=ppo's default; TRL's
  PPOTrainer ignores ``args.gradient_checkpointing``): ``--no-gradient-checkpointing`` turns it off.
* **Allocator.** Like ``python -m align``: jemalloc where installed (``align.malloc.ensure``,
  ``ALIGN_MALLOC=system`` for glibc's malloc).

Deviations that remain (TRL 1.12's code, not settings)
------------------------------------------------------
* No gradient clipping: TRL's PPO loop calls ``optimizer.step()`` without clipping
  (``max_grad_norm`` unused); align clips at ``train.max_grad_norm=1.0``.
* LR schedule: TRL steps its linear schedule once per PPO step (``num_training_steps`` = PPO
  steps); align once per optimizer step (4 per PPO step). Both decay linearly from 3e-4 to 0.
* Rollout log-probs: TRL takes them from ``generate``'s scores (KV-cached, token by token),
  align from a forward pass that the update repeats. Under bf16 autocast the two paths round
  differently, so TRL's first ratio is not 1 and its KL to an identical reference is not 0:
  smoke run (policy == reference at step 1, 4 prompts x 16 tokens) ``objective/kl`` -0.058, i.e.
  -0.0036 per token, ``val/ratio`` 1.006; in fp32 (``--autocast none``) -3e-6. Read TRL's
  bf16 KL with that offset in mind.
* The mask, score-position, approxkl and value differences listed in docs/ppo.md
  ("Deviations from TRL 1.12's experimental/ppo math").
* A completion that samples ``<|endoftext|>`` (the pad TRL is given) is cut there by TRL's masks.
* Value model: a full model, not a LoRA (see above); AdamW on its 135M parameters.
* TRL's AdamW is transformers' ``args.optim`` (adamw_torch_fused on this torch), align's
  ``torch.optim.AdamW``: the same update.

Measurements: seconds per PPO step between TRL's ``on_step_end`` callbacks (the first step is a
warm-up, as in bench/ppo_memory.py: ``s/step`` is the mean over the others; all steps are in
the JSON); peak RSS = ``getrusage`` maxrss at the end of training, net of VmRSS after imports;
KL per token = TRL's ``objective/kl`` (summed over a completion, averaged over completions)
divided by the mean completion length (tokens up to and including EOS), averaged over the last
4 steps like ``score_last4`` (``objective/scores``, after the missing-EOS penalty, as align logs it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = Path("/tmp/trl112")
PIP_STEPS = (
    ["torch==2.13.0"],  # the CPU wheel on local disk; an unpinned torch would download a CUDA build
    ["trl==1.12.*", "transformers==5.24.0", "peft==0.21.2", "accelerate==1.15.0"],
)
DEFAULT_SFT = "/tmp/runs/outputs/sft/2026-11-29_15-56-23"


def setup(venv: Path) -> None:
    """Create the scratch venv with TRL 1.12 and align's versions of its dependencies."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for pkgs in PIP_STEPS:
        subprocess.run([str(venv / "bin" / "pip"), "install", *pkgs], check=True)
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import trl, transformers, peft, accelerate, torch; "
            "print('trl', trl.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, "
            "'accelerate', accelerate.__version__, 'torch', torch.__version__)",
        ],
        check=True,
    )


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help=f"create the scratch venv ({VENV}) and exit")
    ap.add_argument("--venv", type=Path, default=VENV)
    ap.add_argument("--sft", default=DEFAULT_SFT, help="align sft run dir (its adapter/ is the start)")
    ap.add_argument("--out", default="/tmp/trl_ppo/model", help="merged policy (plain HF model dir)")
    ap.add_argument("--metrics", default=None, help="per-step metrics JSON (default: <out>/../metrics.json)")
    # align's stage=ppo defaults (conf/stage/ppo.yaml, align/config.py PPOStageConfig/TrainConfig)
    ap.add_argument("--steps", type=int, default=16, help="train.max_steps (PPO steps)")
    ap.add_argument("--batch-size", type=int, default=8, help="train.batch_size (micro-batch)")
    ap.add_argument("--num-mini-batches", type=int, default=2, help="ppo.num_mini_batches")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="ppo.max_new_tokens")
    ap.add_argument("--max-length", type=int, default=256, help="model.max_length (prompt filter)")
    ap.add_argument(
        "--rollout-batch",
        type=int,
        default=0,
        help="TRL local_rollout_forward_batch_size (0: all prompts of a step)",
    )
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--cliprange", type=float, default=0.2)
    ap.add_argument("--cliprange-value", type=float, default=0.2)
    ap.add_argument("--vf-coef", type=float, default=0.1)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--missing-eos-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--autocast", choices=("auto", "bf16", "none"), default="auto", help="as train.autocast")
    ap.add_argument("--value-head", choices=("zero", "random"), default="zero")
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- prompts


def align_prompt_rows(args, tokenizer) -> list[dict]:
    """The rows align's stage=ppo trains on, in the order its prompt stream yields them."""
    import random
    from types import SimpleNamespace

    from align import data, sampling

    k = args.batch_size * args.num_mini_batches
    # conf/data/ifeval.yaml + DataConfig defaults; training.load_data's arguments
    data_cfg = SimpleNamespace(
        name="ifeval",
        train=None,
        eval=None,
        eval_fraction=0.05,
        max_train_rows=None,
        max_eval_rows=16,
        split="train",
        subset=None,
        on_error="error",
        columns=None,
    )
    split = data.load(
        data_cfg,
        "prompt",
        seed=args.seed,
        needed_train_rows=args.steps * k,
        tokenizer=tokenizer,
        max_length=args.max_length,
    )
    rows = [dict(r) for r in split.train]
    # align.stages.ppo._fitting_prompts
    budget = args.max_length - args.max_new_tokens
    rows = [
        r
        for r, ids in zip(rows, sampling.encode_prompts(tokenizer, [r["prompt"] for r in rows]), strict=True)
        if len(ids) <= budget
    ]
    # align.rl.ppo.PPOTrainer.prompt_stream (one process), flattened for args.steps steps
    rng = random.Random(args.seed)
    out: list[dict] = []
    while len(out) < args.steps * k:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in range(0, len(order) - k + 1, k):
            out += [rows[j] for j in order[i : i + k]]
        if len(order) < k:
            out += [rows[order[j % len(order)]] for j in range(k)]
    return out[: args.steps * k]


# --------------------------------------------------------------------------- reward


def make_judge_reward(tokenizer, rows: list[dict], pad_id: int):
    """An nn.Module that TRL 1.12's ``get_reward`` can call: align's judge:ifeval as a reward model."""
    import torch
    from torch import nn
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from align import sampling
    from align.rl import rollout

    judge = rollout.reward_function("judge:ifeval")  # what align's stage=ppo ppo.reward=judge:ifeval calls
    by_prompt: dict[tuple[int, ...], dict] = {}
    for r, ids in zip(rows, sampling.encode_prompts(tokenizer, [r["prompt"] for r in rows]), strict=True):
        by_prompt.setdefault(tuple(ids), r)
    lengths = sorted({len(k) for k in by_prompt}, reverse=True)

    class Backbone(nn.Module):
        def __init__(self, owner):
            super().__init__()
            self.owner = [owner]  # not a submodule

        def forward(self, input_ids, attention_mask, **_):
            owner = self.owner[0]
            prompts, completions, completion_ids, matched = [], [], [], []
            for ids, m in zip(input_ids.tolist(), attention_mask.bool().tolist(), strict=True):
                real = [t for t, keep in zip(ids, m, strict=True) if keep]
                row = None
                for n in lengths:
                    row = by_prompt.get(tuple(real[:n]))
                    if row is not None:
                        break
                if row is None:
                    raise RuntimeError("JudgeReward: a query matches no prompt of this run")
                comp = real[n:]
                prompts.append(row["prompt"])
                completion_ids.append(comp)
                completions.append(tokenizer.decode(comp, skip_special_tokens=True))
                matched.append(row)
            columns = {k: [r[k] for r in matched] for k in matched[0] if k != "prompt"}
            scores = judge(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            s = torch.tensor([float(x) for x in scores], dtype=torch.float32, device=input_ids.device)
            owner.calls.append(
                {
                    "raw_scores": s.tolist(),
                    "lengths": [len(c) for c in completion_ids],
                    "samples": list(zip(completions[:2], columns.get("id", [None] * 2)[:2], strict=False)),
                }
            )
            hidden = s[:, None, None].expand(-1, input_ids.size(1), 1)  # the score at every position
            return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=(hidden,))

    class JudgeReward(nn.Module):
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.calls: list[dict] = []
            self.backbone = Backbone(self)
            self.score = nn.Identity()

    return JudgeReward()


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.setup:
        setup(args.venv)
        return
    sys.path.insert(0, str(REPO))
    from align import malloc

    malloc.ensure()  # the allocator `python -m align` runs on (jemalloc where installed)

    import tempfile

    import peft
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import PeftModel
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from align import hardware
    from align.cache import cache_root

    after_imports = rss_mb()
    transformers.set_seed(args.seed)  # python, numpy (TRL's minibatch permutation), torch
    k = args.batch_size * args.num_mini_batches
    sft = Path(args.sft)
    adapter = sft / "adapter"
    base_path = cache_root() / "models" / "smollm2-135m-0.1.2"
    for p in (adapter / "adapter_config.json", base_path / "model.safetensors"):
        if not p.is_file():
            sys.exit(f"trl_ppo: {p} is missing (an align sft run dir / align's converted embedded model)")
    out = Path(args.out)
    metrics_path = Path(args.metrics) if args.metrics else out.parent / "metrics.json"

    # tokenizers: align's (saved with the model) and TRL's (a pad token that is not EOS)
    tok_align = AutoTokenizer.from_pretrained(base_path)
    if tok_align.pad_token is None:
        tok_align.pad_token = tok_align.eos_token
    tok = AutoTokenizer.from_pretrained(base_path)
    tok.pad_token = "<|endoftext|>"
    tok.padding_side = "left"
    if tok.pad_token_id == tok.eos_token_id or tok.pad_token_id is None:
        sys.exit("trl_ppo: need a pad token distinct from EOS")

    rows = align_prompt_rows(args, tok_align)
    from align import sampling

    encoded = sampling.encode_prompts(tok_align, [r["prompt"] for r in rows])
    train_ds = Dataset.from_dict({"input_ids": encoded})
    eval_ds = Dataset.from_dict({"input_ids": encoded[:k]})  # unused (num_sample_generations=0)

    # policy: base + SFT LoRA (trainable, "default"); reference: base + SFT LoRA (frozen, "ref")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, str(adapter), adapter_name="default", is_trainable=True)
    policy.load_adapter(str(adapter), adapter_name="ref", is_trainable=False)
    policy.set_adapter("default")
    orig_gen = policy.generation_config.to_dict()
    policy.generation_config.pad_token_id = tok.pad_token_id
    value = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32)
    value.config.pad_token_id = tok.pad_token_id
    if args.value_head == "zero":
        with torch.no_grad():
            value.score.weight.zero_()
    if not args.no_gradient_checkpointing:
        for m in (policy, value):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reward = make_judge_reward(tok_align, rows, tok.pad_token_id)

    autocast = {"bf16": True, "none": False}.get(args.autocast)
    if autocast is None:
        autocast = hardware.cpu_computes_bf16()

    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    n_value = sum(p.numel() for p in value.parameters() if p.requires_grad)
    trainer_dir = tempfile.mkdtemp(prefix="trl-ppo-")
    cfg = PPOConfig(
        output_dir=trainer_dir,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        seed=args.seed,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,  # unused by TRL's PPO loop (no clipping)
        per_device_train_batch_size=k,
        gradient_accumulation_steps=1,
        num_mini_batches=args.num_mini_batches,
        total_episodes=args.steps * k,
        local_rollout_forward_batch_size=args.rollout_batch or k,
        num_sample_generations=0,
        response_length=args.max_new_tokens,
        stop_token="eos",
        temperature=args.temperature,
        missing_eos_penalty=args.missing_eos_penalty,
        num_ppo_epochs=args.ppo_epochs,
        whiten_rewards=False,
        kl_coef=args.kl_coef,
        kl_estimator="k1",
        cliprange=args.cliprange,
        vf_coef=args.vf_coef,
        cliprange_value=args.cliprange_value,
        gamma=args.gamma,
        lam=args.lam,
        model_adapter_name="default",
        ref_adapter_name="ref",
        dataloader_num_workers=0,
    )

    class Clock(TrainerCallback):
        def __init__(self):
            self.t: list[float] = []

        def on_train_begin(self, *a, **kw):
            self.t = [time.perf_counter()]

        def on_step_end(self, *a, **kw):
            self.t.append(time.perf_counter())

    clock = Clock()
    trainer = PPOTrainer(
        args=cfg,
        processing_class=tok,
        model=policy,
        ref_model=None,
        reward_model=reward,
        train_dataset=train_ds,
        value_model=value,
        eval_dataset=eval_ds,
        callbacks=[clock],
    )
    # align's prompt order: no reshuffle (TRL's dataloader has shuffle=True)
    trainer.dataloader = DataLoader(
        train_ds, batch_size=k, shuffle=False, collate_fn=DataCollatorWithPadding(tok), drop_last=True
    )
    print(
        f"trl_ppo: trl {trl.__version__} transformers {transformers.__version__} peft {peft.__version__} "
        f"torch {torch.__version__}; {args.steps} steps x {k} prompts ({args.num_mini_batches} minibatches, "
        f"{args.ppo_epochs} epochs), {args.max_new_tokens} new tokens; autocast {'bf16' if autocast else 'none'}; "
        f"trainable: policy {n_train / 1e6:.2f}M, value {n_value / 1e6:.2f}M; optim {cfg.optim}; "
        f"allocator {malloc.describe()['name']}; cpu {hardware.describe()}",
        flush=True,
    )
    started = time.perf_counter()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        trainer.train()
    train_s = time.perf_counter() - started
    peak = peak_mb()

    # per-step metrics: TRL's log + the judge's raw scores and completion lengths
    logs = [h for h in trainer.state.log_history if "objective/kl" in h]
    calls_per_step = len(reward.calls) // max(len(logs), 1)
    step_s = [b - a for a, b in zip(clock.t, clock.t[1:], strict=False)]
    history = []
    for i, h in enumerate(logs):
        calls = reward.calls[i * calls_per_step : (i + 1) * calls_per_step]
        lens = [x for c in calls for x in c["lengths"]]
        raw = [x for c in calls for x in c["raw_scores"]]
        mean_len = sum(lens) / len(lens)
        history.append(
            h
            | {
                "val/completion_length": mean_len,
                "objective/raw_scores": sum(raw) / len(raw),
                "kl_per_token": h["objective/kl"] / mean_len,
                "time/step_s": step_s[i] if i < len(step_s) else float("nan"),
                "samples": [c["samples"] for c in calls][:1],
            }
        )
    last = history[-4:]
    timed = step_s[1:] or step_s
    summary = {
        "s_per_step": sum(timed) / len(timed),
        "s_per_step_all": sum(step_s) / len(step_s),
        "train_s": train_s,
        "after_imports_mb": after_imports,
        "peak_rss_mb": peak,
        "net_peak_rss_mb": peak - after_imports,
        "kl_per_token_last4": sum(h["kl_per_token"] for h in last) / len(last),
        "score_last4": sum(h["objective/scores"] for h in last) / len(last),
        "raw_score_last4": sum(h["objective/raw_scores"] for h in last) / len(last),
        "first_score": history[0]["objective/scores"],
        "completion_length_last4": sum(h["val/completion_length"] for h in last) / len(last),
        "autocast": "bf16" if autocast else "none",
        "allocator": malloc.describe(),
        "hardware": hardware.describe(),
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "torch": torch.__version__,
        },
        "args": {k_: str(v) for k_, v in vars(args).items()},
    }
    for h in history:
        print(
            f"step {h['step']:>3}: score {h['objective/scores']:.3f} raw {h['objective/raw_scores']:.3f} "
            f"kl {h['objective/kl']:.3f} len {h['val/completion_length']:.1f} kl/token {h['kl_per_token']:.4f} "
            f"lr {h['lr']:.2e} {h['time/step_s']:.1f}s",
            flush=True,
        )

    # the trained policy merged into a plain model dir, with align's tokenizer and generation config
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    # guard: the reference adapter is still the SFT adapter, the policy's moved away from it
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    saved = load_peft_weights(str(adapter), device="cpu")
    ref_now = get_peft_model_state_dict(policy, adapter_name="ref")
    pol_now = get_peft_model_state_dict(policy, adapter_name="default")
    ref_same = all(torch.equal(ref_now[n].cpu(), saved[n]) for n in saved)
    moved = max((pol_now[n].cpu() - saved[n]).abs().max().item() for n in saved)
    print(f"trl_ppo: reference adapter == SFT adapter: {ref_same}; policy moved by max |dW| {moved:.2e}")
    if not ref_same:
        sys.exit("trl_ppo: the reference adapter changed during training")
    policy.set_adapter("default")
    policy.delete_adapter("ref")
    merged = policy.merge_and_unload()
    if hasattr(merged, "gradient_checkpointing_disable"):
        merged.gradient_checkpointing_disable()
    merged.generation_config = transformers.GenerationConfig.from_dict(orig_gen)
    merged.config.use_cache = True
    tmp = out.with_name(out.name + ".tmp")
    merged.save_pretrained(tmp, safe_serialization=True)
    tok_align.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps({"summary": summary, "history": history}, indent=2, default=str))
    print(f"trl_ppo: merged policy -> {out}; metrics -> {metrics_path}", flush=True)
    print(
        f"trl_ppo: s/step={summary['s_per_step']:.2f} peak_rss_mb={peak:.0f} "
        f"net_peak_rss_mb={summary['net_peak_rss_mb']:.0f} kl_per_token={summary['kl_per_token_last4']:.4f} "
        f"score_last4={summary['score_last4']:.3f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
