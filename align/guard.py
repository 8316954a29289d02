"""Training that loses nothing and never goes silently wrong.

:func:`train` runs a transformers/TRL trainer with

* SIGTERM / SIGINT handling: the first signal finishes the current optimizer step, saves
  a full checkpoint (adapter, optimizer, scheduler, RNG, trainer state: the Trainer's own
  checkpointing) and stops; :class:`align.runs.Interrupted` then tells the CLI how to
  resume. A second signal aborts at once.
* a non-finite check of every gradient before each optimizer step: ``train.on_nan=stop``
  drops the update and stops with a message naming the step (the last good checkpoint is
  kept); ``train.on_nan=skip`` drops the update and goes on, counting the skipped steps.
* resuming from ``ctx.resume_from`` (optimizer, scheduler, RNG and data order restored).
* a collapse check for preference optimisation (:class:`CollapseGuard`): when the policy's
  log-prob of the chosen responses falls more than ``train.max_logp_drop`` nats below where
  it started (orpo, simpo: ``train.max_token_logp_drop`` nats per token), warn once (``train.on_collapse=warn``) or stop keeping the last good
  checkpoint (``stop``).

All ranks agree on a stop (the flag is all-reduced), so a multi-process run never hangs.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from align.artifacts import write_json_atomic
from align.console import close_data_bar
from align.errors import AlignError
from align.runs import Interrupted, last_checkpoint, main_process

STATE_FILE = "align_state.json"  # in each checkpoint: counters the trainer does not save itself


class Guard(TrainerCallback):
    def __init__(self, on_nan: str = "stop", trainer: Any = None, resume_from: str | None = None):
        self.on_nan = on_nan
        self.trainer = trainer
        self.resume_from = resume_from
        self.signum: int | None = None  # set by the signal handler
        self.stopped_by: int | None = None  # the signal all ranks agreed to stop on
        self.bad_step: int | None = None
        self.skipped: list[int] = []

    # ---------------------------------------------------------------- signals
    @contextlib.contextmanager
    def signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            if self.signum is not None:  # second signal: abort now
                signal.signal(signum, previous[signum] or signal.SIG_DFL)
                raise KeyboardInterrupt
            self.signum = signum
            if main_process():
                print(
                    f"\nalign: got {signal.Signals(signum).name}; saving a checkpoint after this step "
                    "(send it again to abort without saving)",
                    flush=True,
                )

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _agreed_signal(self, args: Any) -> int | None:
        import torch
        import torch.distributed as dist

        mine = self.signum or 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([mine], device=args.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            mine = int(t.item())
        return mine or None

    # ---------------------------------------------------------------- callback
    def on_train_begin(self, args, state, control, **kwargs):
        # TRL counts the tokens seen (train/num_tokens) outside the trainer state: restore it
        path = Path(self.resume_from or "", STATE_FILE)
        if self.resume_from and path.is_file() and hasattr(self.trainer, "_total_train_tokens"):
            self.trainer._total_train_tokens = json.loads(path.read_text()).get("total_train_tokens", 0)

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and ckpt.is_dir():
            t = self.trainer
            loss_sum = getattr(t, "_total_loss_scalar", 0.0) + float(getattr(t, "_tr_loss", 0.0))
            state_ = {"total_train_tokens": getattr(t, "_total_train_tokens", None), "loss_sum": loss_sum}
            (ckpt / STATE_FILE).write_text(json.dumps(state_ | {"step": state.global_step}))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        if model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            return
        step = state.global_step + 1
        for p in model.parameters():  # the optimizer skips parameters without a gradient
            p.grad = None
        if self.on_nan == "skip":
            self.skipped.append(step)
            if main_process():
                print(f"\nalign: warning: non-finite gradient at step {step}; update skipped", flush=True)
        else:
            self.bad_step = step
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.bad_step is not None:
            control.should_save = False
            control.should_training_stop = True
            return
        sig = self._agreed_signal(args)
        if sig:
            self.stopped_by = sig
            control.should_save = True
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.bad_step is not None:
            control.should_save = False


class CollapseGuard(TrainerCallback):
    """Preference optimisation can lower the likelihood of the chosen *and* the rejected
    responses together while their margin grows: the policy drifts to degenerate text (the
    results table saw DPO from an SFT start lose ~27 nats on both in 40 steps and answer
    ``<<<<<<``).

    With ``beta`` (DPO, KTO): those trainers log ``rewards/chosen = beta * (log p(chosen) -
    log p_ref(chosen))`` on the same rows for both models, and the reference is where the policy
    started, so ``-rewards/chosen / beta`` is the drop since step 0 (nats per response) without
    the noise of comparing different batches.

    Without (ORPO, SimPO: no reference model): their trainers log ``logps/chosen``, the mean
    per-token log-prob of the chosen responses; the drop is the first logged value (kept in the
    trainer state's log history, so it survives a resume) minus the current one, in nats per
    token. Per-token values vary far less between batches than per-response sums do.
    """

    def __init__(
        self, max_drop: float, on_collapse: str, beta: float | None, key: str = "train.max_logp_drop"
    ):
        self.max_drop, self.on_collapse, self.beta, self.key = max_drop, on_collapse, beta, key
        self.unit = "nats" if beta else "nats per token"
        self.collapsed_step: int | None = None
        self.drop: float | None = None

    def _drop(self, logs: dict[str, Any], state: Any) -> float | None:
        if self.beta:
            r = logs.get("rewards/chosen")
            return None if r is None else -float(r) / self.beta
        now = logs.get("logps/chosen")
        if now is None:
            return None
        start = next(h["logps/chosen"] for h in state.log_history if "logps/chosen" in h)
        return float(start) - float(now)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.collapsed_step is not None:
            return
        drop = self._drop(logs or {}, state)
        if drop is None or drop <= self.max_drop:
            return
        self.collapsed_step, self.drop = state.global_step, drop
        state.log_history.append({"collapse/logp_drop": drop, "step": state.global_step})
        if main_process():
            print(
                f"\nalign: warning: the policy's log-prob of the chosen responses fell {drop:.1f} {self.unit} "
                f"below where it started (step {state.global_step}; {self.key}="
                f"{self.max_drop:g}): the model is collapsing. Lower train.lr"
                + ("" if self.on_collapse == "stop" else ", or set train.on_collapse=stop to stop here"),
                flush=True,
            )
        if self.on_collapse == "stop":  # on_log runs before this step's checkpoint is written
            control.should_training_stop = True
            control.should_save = False


def trainer_kwargs(cfg: Any) -> dict[str, Any]:
    """TrainingArguments for checkpointing and non-finite handling (merged by training.trainer_args)."""
    t = cfg.train
    return dict(
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        save_total_limit=t.save_total_limit,
        save_only_model=False,
        # a non-finite loss must show in the logs, not be averaged away (unless skipping is asked for)
        logging_nan_inf_filter=str(getattr(t.on_nan, "value", t.on_nan)) == "skip",
    )


def train(ctx: Any, trainer: Any, *, beta: float | None = None, reference_free: bool = False) -> None:
    """``trainer.train()`` with signal handling, the non-finite check and resume; with ``beta``
    (a preference stage whose logs carry ``rewards/chosen`` against its reference: dpo, kto) or
    ``reference_free`` (logs carry the per-token ``logps/chosen``: orpo, simpo) also the collapse
    check (:class:`CollapseGuard`)."""
    t = ctx.cfg.train
    on_nan = str(getattr(t.on_nan, "value", t.on_nan))
    guard = Guard(on_nan, trainer=trainer, resume_from=getattr(ctx, "resume_from", None))
    trainer.add_callback(guard)
    from align import backbone

    every = backbone.detect_runtime(ctx.cfg).checkpoint_every  # train.checkpoint_every, 0 resolved
    if every > 1:
        trainer.add_callback(backbone.checkpoint_callback(every))
    collapse = None
    on_collapse = str(getattr(t.on_collapse, "value", t.on_collapse))
    if beta and t.max_logp_drop is not None:
        collapse = CollapseGuard(float(t.max_logp_drop), on_collapse, beta)
    elif reference_free and t.max_token_logp_drop is not None:
        collapse = CollapseGuard(float(t.max_token_logp_drop), on_collapse, None, "train.max_token_logp_drop")
    if collapse is not None:
        trainer.add_callback(collapse)
    resume_from = getattr(ctx, "resume_from", None)
    close_data_bar()  # the data passes are over: training draws its own bar
    with guard.signals():
        out = trainer.train(resume_from_checkpoint=resume_from)
    step = trainer.state.global_step
    saved = Path(resume_from or "", STATE_FILE)
    if resume_from and saved.is_file() and step and trainer.state.log_history:
        # the Trainer averages train_loss over this call only; report the whole run's average
        before = json.loads(saved.read_text())
        whole = (before["loss_sum"] + out.training_loss * (step - before["step"])) / step
        for entry in reversed(trainer.state.log_history):
            if "train_loss" in entry:
                entry["train_loss"] = whole
                break
    if guard.skipped:
        trainer.state.log_history.append({"skipped_nonfinite_steps": len(guard.skipped), "step": step})
    if trainer.is_world_process_zero():  # every logged step; metrics.json keeps only the last values
        write_json_atomic(ctx.run_dir / "log_history.json", trainer.state.log_history)
    resume = f"python -m align stage={ctx.cfg.stage} resume={ctx.run_dir}"
    if guard.bad_step is not None:
        ckpt = last_checkpoint(ctx.run_dir)
        kept = (
            f"the last good checkpoint is {ckpt}; after fixing the cause, continue with: {resume}"
            if ckpt
            else f"no checkpoint was saved before it (train.save_steps={ctx.cfg.train.save_steps})"
        )
        raise AlignError(
            f"non-finite loss or gradient (NaN/inf) at step {guard.bad_step}; training stopped. "
            f"Lower train.lr, check the data, or set train.on_nan=skip to drop such steps; {kept}"
        )
    if collapse is not None and collapse.collapsed_step is not None and collapse.on_collapse == "stop":
        ckpt = last_checkpoint(ctx.run_dir)
        kept = (
            f"the last checkpoint before it is {ckpt}"
            if ckpt
            else f"no checkpoint was saved before it (train.save_steps={t.save_steps})"
        )
        stage = ctx.cfg.stage
        remedy = f"Lower train.lr (or raise {stage}.beta)" if collapse.beta else "Lower train.lr"
        raise AlignError(
            f"training collapsed at step {collapse.collapsed_step}: the log-prob of the chosen responses "
            f"fell {collapse.drop:.1f} {collapse.unit} below the start ({collapse.key}={collapse.max_drop:g}, "
            f"train.on_collapse=stop); no adapter was saved. {remedy}; {kept}"
        )
    if guard.stopped_by:
        name = signal.Signals(guard.stopped_by).name
        ckpt = last_checkpoint(ctx.run_dir)
        raise Interrupted(
            f"interrupted by {name} at step {step}; checkpoint saved to {ckpt}\n  resume with: {resume}",
            guard.stopped_by,
        )


class PPOCheckpoint:
    """Checkpoints for align's own PPO loop (align/rl/ppo.py), which has no Trainer to do it.

    A checkpoint (``checkpoints/checkpoint-<step>/``) holds the trainable weights (policy and
    value adapters, value head), the optimizer, the scheduler, the KL controller, the step
    history, and each rank's RNG state; the prompt stream is replayed to the same position on
    resume. SIGTERM/SIGINT saves one and stops, as for the other stages.
    """

    STATE = "ppo_state.pt"

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.every = int(ctx.cfg.train.save_steps)
        self.keep = max(int(ctx.cfg.train.save_total_limit), 1)
        self.guard = Guard()
        self.stopped: tuple[int, int] | None = None  # (signal, step)

    @staticmethod
    def _rank() -> int:
        import os

        return int(os.environ.get("RANK", "0"))

    def restore(self, trainer: Any) -> list[dict[str, float]]:
        """The history of the steps already done ([] for a fresh run); the trainer's state is restored."""
        import random

        import torch

        ckpt = getattr(self.ctx, "resume_from", None)
        if not ckpt:
            return []
        state = torch.load(Path(ckpt) / self.STATE, weights_only=False)
        with torch.no_grad():
            for p, v in zip(trainer.models.trainable, state["trainable"], strict=True):
                p.copy_(v)
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.kl_ctl.value = state["kl_value"]
        rng = torch.load(Path(ckpt) / f"rng_{self._rank()}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return list(state["history"])

    def after_step(self, trainer: Any, step: int, history: list[dict[str, float]]) -> bool:
        """Save when due or signalled; True: stop the loop."""
        from types import SimpleNamespace

        sig = self.guard._agreed_signal(SimpleNamespace(device=trainer.device))
        if sig or (self.every > 0 and step % self.every == 0 and step < trainer.t.max_steps):
            self.save(trainer, step, history)
        if sig:
            self.stopped = (sig, step)
        return bool(sig)

    def save(self, trainer: Any, step: int, history: list[dict[str, float]]) -> None:
        import random
        import shutil

        import torch

        from align.runs import checkpoints

        d = self.ctx.run_dir / "checkpoints" / f"checkpoint-{step}"
        d.mkdir(parents=True, exist_ok=True)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda}
        torch.save(rng, d / f"rng_{self._rank()}.pt")
        if not main_process():
            return
        state = {
            "step": step,
            "trainable": [p.detach().cpu().clone() for p in trainer.models.trainable],
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "kl_value": trainer.kl_ctl.value,
            "history": history,
        }
        torch.save(state, d / (self.STATE + ".tmp"))
        (d / (self.STATE + ".tmp")).replace(d / self.STATE)  # a checkpoint is complete once this exists
        for old in checkpoints(self.ctx.run_dir)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def raise_if_stopped(self) -> None:
        if self.stopped:
            sig, step = self.stopped
            run_dir = self.ctx.run_dir
            raise Interrupted(
                f"interrupted by {signal.Signals(sig).name} at step {step}; checkpoint saved to "
                f"{run_dir / 'checkpoints' / f'checkpoint-{step}'}\n  resume with: python -m align "
                f"stage={self.ctx.cfg.stage} resume={run_dir}",
                sig,
            )
