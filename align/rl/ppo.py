"""The PPO loop on one shared base with named LoRA adapters.

Roles and where they live (``ppo.separate_models=false``, the default):

* ``policy``    adapter ``default`` (trainable; from the SFT adapter, or fresh)
* ``ref``       adapter ``ref`` (a frozen copy of the SFT adapter), or the adapter-disabled base
* ``value``     adapter ``value`` + a Linear(hidden, 1) head (trainable; from the reward model, or fresh)
* ``reward``    adapter ``reward`` + its saved ``score`` head (frozen), or a programmatic judge

The base weights are frozen and shared by all four. With ``ppo.separate_models=true`` every
role gets its own copy of the base (TRL's layout; the memory baseline of bench/ppo_memory.py).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from align import backbone, rewards, sampling
from align.errors import AlignError
from align.rl import losses, rollout

log = logging.getLogger(__name__)

ADAPTER = {"policy": "default", "ref": "ref", "value": "value", "reward": "reward"}


class ScalarHead(nn.Linear):
    """Linear(hidden, 1): the value head, or a reward model's score head.

    Without ``weight`` it starts at zero: every value is 0 until the value loss moves it, so
    the first advantages are the returns themselves. A randomly initialised head (normal,
    std 1/sqrt(hidden)) on SmolLM2's final hidden states (norm ~45) gave per-token values
    with std ~2 and token-to-token differences of std ~2.7, ten times the range of a judge's
    score (0..1): GAE's deltas were mostly that noise, and PPO against judge:ifeval did not learn.
    """

    def __init__(self, hidden: int, weight: torch.Tensor | None = None):
        super().__init__(hidden, 1, bias=False)
        with torch.no_grad():
            if weight is not None:
                self.weight.copy_(weight.reshape(1, hidden))
            else:
                self.weight.zero_()


@dataclass
class PPOModels:
    models: dict[str, Any]  # role -> model (the same object for every role when shared)
    value_head: ScalarHead
    score_head: ScalarHead | None  # None: the reward is a judge
    ref_disabled: bool  # reference = the policy's base with adapters disabled
    trainable: list[nn.Parameter] = field(default_factory=list)

    @property
    def shared(self) -> bool:
        return len({id(m) for m in self.models.values()}) == 1

    @property
    def policy(self):
        return self.models["policy"]

    @contextlib.contextmanager
    def active(self, role: str) -> Iterator[Any]:
        """The model with ``role``'s adapter active. Switching never changes which parameters train."""
        model = self.models[role]
        if role == "ref" and self.ref_disabled:
            if hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    yield model
            else:
                yield model
            return
        if hasattr(model, "base_model") and hasattr(model, "peft_config"):
            model.base_model.set_adapter(ADAPTER[role], inference_mode=True)  # freezes all adapters
            for p in self.trainable:  # ... so re-enable the ones we train
                p.requires_grad_(True)
        yield model


def _no_dropout(model) -> None:
    # PPO's ratio must compare the same function at rollout and update time (TRL does the same)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def build_models(cfg: Any, path: str, rt: Any, *, policy_dir=None, reward_dir=None) -> PPOModels:
    """Load the base once (or once per role with ppo.separate_models) and put the adapters on it."""
    p = cfg.ppo
    separate = bool(p.separate_models)

    def base():
        return backbone.load_base_model(path, cfg, rt)

    shared = base()
    models: dict[str, Any] = {}
    policy, _ = backbone.add_adapter(shared, cfg, ADAPTER["policy"], from_dir=policy_dir, trainable=True)
    models["policy"] = policy
    if policy_dir is not None:
        models["ref"], _ = backbone.add_adapter(
            base() if separate else policy, cfg, ADAPTER["ref"], from_dir=policy_dir, trainable=False
        )
    else:
        models["ref"] = base() if separate else policy
    hidden = backbone.hidden_size(policy)
    score_head = None
    score_weight = None
    if reward_dir is not None:
        models["reward"], extra = backbone.add_adapter(
            base() if separate else policy, cfg, ADAPTER["reward"], from_dir=reward_dir, trainable=False
        )
        score_weight = backbone.scalar_head_weight(extra, hidden, where=f"ppo.reward={reward_dir}")
        score_head = ScalarHead(hidden, score_weight).to(rt.device).requires_grad_(False)
    value_init = reward_dir if (reward_dir is not None and p.value_from_reward) else None
    models["value"], _ = backbone.add_adapter(
        base() if separate else policy, cfg, ADAPTER["value"], from_dir=value_init, trainable=True
    )
    value_head = ScalarHead(hidden, score_weight if value_init else None).to(rt.device)
    for m in {id(m): m for m in models.values()}.values():
        _no_dropout(m)
        if rt.gradient_checkpointing:  # recompute activations in backward: less memory, ~1/3 more compute
            backbone.enable_checkpointing(m, {"use_reentrant": False})
            backbone.checkpoint_every_nth_layer(m, rt.checkpoint_every)
        if hasattr(m, "base_model") and hasattr(m, "peft_config"):
            m.base_model.set_adapter(
                ADAPTER["policy"] if "default" in m.peft_config else next(iter(m.peft_config)),
                inference_mode=True,
            )
    trainable = [
        q for n, q in models["policy"].named_parameters() if f".{ADAPTER['policy']}." in n and "lora_" in n
    ]
    trainable += [
        q for n, q in models["value"].named_parameters() if f".{ADAPTER['value']}." in n and "lora_" in n
    ]
    trainable += list(value_head.parameters())
    for q in trainable:
        q.requires_grad_(True)
    return PPOModels(models, value_head, score_head, ref_disabled=policy_dir is None, trainable=trainable)


# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Dist:
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            return cls(td.get_rank(), td.get_world_size())
        return cls()

    def mean(self, values: dict[str, float], device: str) -> dict[str, float]:
        if self.world == 1 or not values:
            return values
        import torch.distributed as td

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
        td.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    def average_grads(self, params: list[nn.Parameter]) -> None:
        if self.world == 1:
            return
        import torch.distributed as td

        for q in params:  # PPOTrainer allocates every gradient up front and keeps it
            td.all_reduce(q.grad)
            q.grad /= self.world

    def check_in_sync(self, params: list[nn.Parameter]) -> None:
        """Every rank must hold the same trainable weights (they start equal and apply the same
        averaged gradients); a rank that drifted would save or evaluate a different model."""
        if self.world == 1:
            return
        import torch.distributed as td

        total = torch.stack([q.detach().double().sum() for q in params]).sum().to(params[0].device)
        lo, hi = total.clone(), total.clone()
        td.all_reduce(lo, op=td.ReduceOp.MIN)
        td.all_reduce(hi, op=td.ReduceOp.MAX)
        if not torch.isclose(lo, hi, rtol=1e-9, atol=1e-9):
            raise AlignError(
                f"PPO ranks diverged: trainable-weight checksums range from {lo.item()} to {hi.item()}"
            )


# --------------------------------------------------------------------------- one PPO step


@dataclass
class Batch:
    """A scored rollout with everything the update needs (per-token tensors are (B, C))."""

    ro: rollout.Rollout
    scores: torch.Tensor  # after the missing-EOS penalty and clipping
    raw_scores: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


class PPOTrainer:
    def __init__(
        self,
        cfg: Any,
        models: PPOModels,
        tokenizer: Any,
        device: str,
        reward_fn: Callable[..., Any] | None = None,
        dist: Dist | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        from transformers import get_scheduler

        self.cfg, self.p, self.t = cfg, cfg.ppo, cfg.train
        self.step, self.skipped_updates, self.generate_s = 0, 0, 0.0
        self.models, self.tokenizer, self.device = models, tokenizer, device
        self.reward_fn = reward_fn
        self.autocast_dtype = autocast_dtype  # bf16 mixed precision (Runtime.autocast_dtype)
        if reward_fn is None and models.score_head is None:
            raise AlignError("PPO needs a reward: a reward adapter (ppo.reward=<rm run dir>) or a judge")
        self.dist = dist or Dist.current()
        self.stop_ids = sampling.stop_ids(tokenizer, models.policy)
        self.kl_ctl = losses.KLController(self.p.kl_coef, self.p.target_kl, self.p.kl_horizon)
        self.optimizer = torch.optim.AdamW(models.trainable, lr=self.t.lr, weight_decay=self.t.weight_decay)
        updates = self.t.max_steps * self.p.ppo_epochs * self.p.num_mini_batches
        warmup = int(self.t.warmup * updates) if self.t.warmup < 1 else int(self.t.warmup)
        self.scheduler = get_scheduler(self.t.lr_scheduler, self.optimizer, warmup, updates)
        self._allocate_training_state()

    def _allocate_training_state(self) -> None:
        """Gradients and AdamW moments, allocated once before the first rollout and kept (the
        gradients zeroed in place, not freed). Allocated lazily inside the first update, these
        thousands of small long-lived tensors land between that update's short-lived activations
        and pin the allocator's heap: measured ~300 MB more peak RSS on SmolLM2-135M
        (bench/ppo_memory.py). A loaded checkpoint's optimizer state replaces the zeros."""
        params = [q for g in self.optimizer.param_groups for q in g["params"]]
        for q in params:
            q.grad = torch.zeros_like(q)
        # AdamW's own lazy initialisation, done now: step 0, zero first and second moments
        state = self.optimizer.state_dict()
        state["state"] = {
            i: {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(q), "exp_avg_sq": torch.zeros_like(q)}
            for i, q in enumerate(params)
        }
        self.optimizer.load_state_dict(state)

    @property
    def rollout_size(self) -> int:
        """Prompts per PPO step on this process."""
        return self.t.batch_size * self.t.grad_accum * self.p.num_mini_batches

    def autocast(self):
        """Every forward pass (rollout and update alike, so the PPO ratio starts at 1) under it."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.autocast_dtype)

    def _chunks(self, n: int) -> list[torch.Tensor]:
        return list(torch.arange(n).split(self.t.batch_size))

    # ---- rollout and scoring

    @torch.no_grad()
    def score(self, ro: rollout.Rollout) -> torch.Tensor:
        if self.reward_fn is not None:
            out = self.reward_fn(
                prompts=ro.prompts,
                completions=ro.completions,
                completion_ids=[
                    ids[: int(m.sum())].tolist() for ids, m in zip(ro.completion_ids, ro.mask, strict=True)
                ],
                **ro.columns,
            )
            scores = torch.tensor([float(s) for s in out], dtype=torch.float32, device=self.device)
            if scores.numel() != len(ro.completions):
                raise AlignError(
                    f"the reward function returned {scores.numel()} scores for {len(ro.completions)} completions"
                )
            return scores
        # the reward model reads the text as it was trained on it (rewards.reward_texts: the chat
        # template's end of turn after the completion) at the token its score was trained at
        # (rewards.score_index), not at the sampled EOS: there its score is untrained noise
        texts = rewards.reward_texts(self.tokenizer, ro.prompts, ro.completions)
        head = self.models.score_head
        parts = []
        with self.models.active("reward") as model:
            for idx in self._chunks(len(texts)):
                ids, mask = rewards.encode_right_padded(self.tokenizer, [texts[i] for i in idx], self.device)
                hidden = rollout.hidden_states(model, ids, mask)
                at = rewards.score_index(ids, self.tokenizer.pad_token_id)
                parts.append(head(hidden[torch.arange(len(at)), at].to(head.weight.dtype)).squeeze(-1))
        return torch.cat(parts).float()

    @torch.no_grad()
    def make_batch(self, rows: list[dict[str, Any]]) -> Batch:
        with self.autocast():
            return self._make_batch(rows)

    def _make_batch(self, rows: list[dict[str, Any]]) -> Batch:
        p = self.p
        prompts = [r["prompt"] for r in rows]
        started = time.perf_counter()
        with self.models.active("policy") as model:
            model.eval()
            ro = rollout.generate(
                model, self.tokenizer, prompts, p, self.device, self.stop_ids, autocast=self.autocast_dtype
            )
        self.generate_s = time.perf_counter() - started  # sampling alone, of time/rollout_s
        ro.columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        raw = self.score(ro)
        scores = raw.clone()
        if p.missing_eos_penalty is not None:
            scores[~ro.has_eos] -= p.missing_eos_penalty
        if p.reward_clip is not None:
            scores = scores.clamp(-p.reward_clip, p.reward_clip)
        C = ro.completion_ids.size(1)
        logprobs = torch.zeros(len(rows), C, device=self.device)
        ref_logprobs = torch.zeros_like(logprobs)
        values = torch.zeros_like(logprobs)
        for role in ("policy", "ref", "value"):
            head_dtype = None if role == "value" else self.autocast_dtype  # the value pass skips the LM head
            with self.models.active(role) as model, sampling.head_in_dtype(model, head_dtype):
                for idx in self._chunks(len(rows)):
                    sel = ro.select(idx)
                    w = sel["width"]
                    if role == "value":
                        hidden = rollout.hidden_states(model, sel["input_ids"], sel["attention_mask"])
                        values[idx, :w] = rollout.completion_values(self.models.value_head, hidden, w).float()
                    else:
                        lp, _ = rollout.token_logprobs(
                            model, sel["input_ids"], sel["attention_mask"], w, p.temperature
                        )
                        (logprobs if role == "policy" else ref_logprobs)[idx, :w] = lp
        mask = ro.mask
        kl = losses.per_token_kl(logprobs, ref_logprobs, mask, p.kl_estimator)
        rewards = losses.token_rewards(scores, kl, mask, self.kl_ctl.value)
        if p.whiten_rewards:
            rewards = losses.masked_whiten(rewards, mask, shift_mean=False)
        values = values * mask
        advantages, returns = losses.gae(rewards, values, mask, p.gamma, p.lam)
        advantages = losses.masked_whiten(advantages, mask)
        return Batch(
            ro, scores, raw, logprobs * mask, ref_logprobs * mask, values, kl, rewards, advantages, returns
        )

    # ---- learning

    def _grads_finite(self) -> bool:
        return all(bool(torch.isfinite(q.grad).all()) for q in self.models.trainable if q.grad is not None)

    def update(self, b: Batch) -> dict[str, float]:
        p, t = self.p, self.t
        n = len(b.ro.completions)
        stats: dict[str, list[float]] = {
            k: [] for k in ("pg", "vf", "clip", "vclip", "approxkl", "ratio", "entropy")
        }
        for m in {id(m): m for m in self.models.models.values()}.values():
            m.train()
        grad_norm = float("nan")  # stays NaN when every update of the step was non-finite and skipped
        for _ in range(p.ppo_epochs):
            order = torch.randperm(n)
            for mb in order.chunk(p.num_mini_batches):
                micro = list(mb.split(t.batch_size))
                for idx in micro:
                    sel = b.ro.select(idx)
                    w = sel["width"]
                    mask = b.ro.mask[idx, :w]
                    # policy and value are separate parameters: two backward passes give the
                    # gradients of (pg + vf_coef * vf) with one graph alive at a time (half the
                    # activation memory of building both before a joint backward)
                    with self.models.active("policy") as model, self.autocast():
                        new_lp, ent = rollout.token_logprobs(
                            model,
                            sel["input_ids"],
                            sel["attention_mask"],
                            w,
                            p.temperature,
                            with_entropy=True,
                        )
                        pg, s = losses.policy_loss(
                            new_lp, b.logprobs[idx, :w], b.advantages[idx, :w], mask, p.cliprange
                        )
                    (pg / len(micro)).backward()
                    with self.models.active("value") as model, self.autocast():
                        hidden = rollout.hidden_states(model, sel["input_ids"], sel["attention_mask"])
                        vpred = rollout.completion_values(self.models.value_head, hidden, w).float()
                        vf, vclip = losses.value_loss(
                            vpred, b.values[idx, :w], b.returns[idx, :w], mask, p.cliprange_value
                        )
                    (p.vf_coef * vf / len(micro)).backward()
                    stats["pg"].append(pg.item())
                    stats["vf"].append(vf.item())
                    stats["clip"].append(s["clipfrac"].item())
                    stats["vclip"].append(vclip.item())
                    stats["approxkl"].append(s["approxkl"].item())
                    stats["ratio"].append(s["ratio"].item())
                    stats["entropy"].append(losses.masked_mean(ent, mask).item())
                self.dist.average_grads(self.models.trainable)
                if not self._grads_finite():  # train.on_nan: stop, or drop this update
                    self.optimizer.zero_grad(set_to_none=False)
                    if self.t.on_nan != "skip":
                        raise AlignError(
                            f"non-finite loss or gradient (NaN/inf) at PPO step {self.step}; stopped "
                            "(train.on_nan=stop). Checkpoints of earlier steps are kept under "
                            "<run dir>/checkpoints; lower train.lr or ppo.reward_clip, or set train.on_nan=skip"
                        )
                    self.skipped_updates += 1
                    continue
                grad_norm = torch.nn.utils.clip_grad_norm_(self.models.trainable, t.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=False)
        ratios = torch.tensor(stats["ratio"])
        return {
            "loss/policy": sum(stats["pg"]) / len(stats["pg"]),
            "loss/value": sum(stats["vf"]) / len(stats["vf"]),
            "policy/clipfrac": sum(stats["clip"]) / len(stats["clip"]),
            "policy/approxkl": sum(stats["approxkl"]) / len(stats["approxkl"]),
            "policy/entropy": sum(stats["entropy"]) / len(stats["entropy"]),
            "val/clipfrac": sum(stats["vclip"]) / len(stats["vclip"]),
            "val/ratio": ratios.mean().item(),
            "val/ratio_var": ratios.var().item() if len(ratios) > 1 else 0.0,
            "train/grad_norm": float(grad_norm),
        }

    def step_metrics(self, b: Batch) -> dict[str, float]:
        mask = b.ro.mask
        kl_sum = b.kl.sum(1)
        non_score = (-self.kl_ctl.value * b.kl).sum(1)
        return {
            "objective/kl": kl_sum.mean().item(),
            "objective/scores": b.scores.mean().item(),
            "objective/raw_scores": b.raw_scores.mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (b.scores + non_score).mean().item(),
            "objective/entropy": (-(b.logprobs) * mask).sum(1).mean().item(),
            "objective/kl_coef": self.kl_ctl.value,
            "val/completion_length": mask.sum(1).mean().item(),
            "val/eos_fraction": b.ro.has_eos.float().mean().item(),
            "val/advantages_mean": losses.masked_mean(b.advantages, mask).item(),
            "val/returns_mean": losses.masked_mean(b.returns, mask).item(),
        }

    # ---- the loop

    def prompt_stream(self, rows: list[dict[str, Any]], seed: int) -> Iterator[list[dict[str, Any]]]:
        """This process's share of the prompts, ``rollout_size`` at a time, reshuffled every pass."""
        rng = random.Random(seed)
        k = self.rollout_size
        while True:
            order = list(range(len(rows)))
            rng.shuffle(order)
            mine = order[self.dist.rank :: self.dist.world]
            for i in range(0, len(mine) - k + 1, k):
                yield [rows[j] for j in mine[i : i + k]]
            if len(mine) < k:
                yield [rows[mine[j % len(mine)]] for j in range(k)]

    def train(
        self, rows: list[dict[str, Any]], tracker: Any = None, seed: int = 0, checkpoint: Any = None
    ) -> list[dict[str, float]]:
        """``checkpoint`` (align.guard.PPOCheckpoint): restore a resumed run, save / stop after steps."""
        from tqdm.auto import tqdm

        main = self.dist.rank == 0
        stream = self.prompt_stream(rows, seed)
        history: list[dict[str, float]] = checkpoint.restore(self) if checkpoint is not None else []
        for _ in history:  # resumed: replay the prompt stream past the steps already done
            next(stream)
        first = len(history) + 1
        bar = tqdm(
            range(first, self.t.max_steps + 1),
            initial=first - 1,
            total=self.t.max_steps,
            desc="ppo",
            disable=not main,
            dynamic_ncols=True,
        )
        for step in bar:
            started = time.perf_counter()
            self.step = step
            batch = self.make_batch(next(stream))
            rollout_s = time.perf_counter() - started
            backbone.release_host_memory()  # the update starts from what is live, not the rollout's peak
            metrics = self.step_metrics(batch) | self.update(batch)
            backbone.release_host_memory()
            metrics = self.dist.mean(metrics, self.device)
            self.kl_ctl.update(metrics["objective/kl"], self.rollout_size * self.dist.world)
            metrics |= {
                "train/lr": self.scheduler.get_last_lr()[0],
                "time/step_s": time.perf_counter() - started,
                "time/rollout_s": rollout_s,  # sampling + scoring + the policy/ref/value forward passes
                "time/generate_s": self.generate_s,
                "train/episodes": step * self.rollout_size * self.dist.world,
                "train/skipped_nonfinite_updates": float(self.skipped_updates),
            }
            history.append(metrics)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            if tracker is not None and main:
                if step % max(self.t.logging_steps, 1) == 0 or step == 1 or step == self.t.max_steps:
                    tracker.log(metrics, step=step)
                if self.p.sample_every and (step % self.p.sample_every == 0 or step == 1):
                    rows_ = [
                        [step, _show(pr), c, float(s)]
                        for pr, c, s in zip(
                            batch.ro.prompts, batch.ro.completions, batch.scores.tolist(), strict=True
                        )
                    ]
                    tracker.table("samples", ["step", "prompt", "completion", "score"], rows_)
            if checkpoint is not None and checkpoint.after_step(self, step, history):
                break
        return history

    @torch.no_grad()
    def evaluate(self, rows: list[dict[str, Any]], role: str = "policy", seed: int = 0) -> dict[str, float]:
        """Mean score (before the EOS penalty) and completion length of ``role`` sampling on ``rows``."""
        if not rows:
            return {}
        rows = rows[self.dist.rank :: self.dist.world]
        torch.manual_seed(seed)
        with self.models.active(role) as model:
            model.eval()
            ro = rollout.generate(
                model, self.tokenizer, [r["prompt"] for r in rows], self.p, self.device, self.stop_ids
            )
        ro.columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        out = {
            "score": self.score(ro).mean().item(),
            "completion_length": ro.mask.sum(1).mean().item(),
        }
        return self.dist.mean(out, self.device)


def _show(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
