"""Configuration schema: dataclasses registered in Hydra's ConfigStore.

Every key a user may set on the command line exists here with a default, so a misspelt
key or a wrong type fails at composition time with a message that names the key
(Hydra's struct mode does that for us). Enumerated choices are Enums for the same
reason. Cross-field rules that a type cannot express live in :func:`validate`.

This module imports only the standard library, Hydra and OmegaConf: ``python -m align
--help`` must stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from align.errors import AlignError

STAGES = ("sft", "dpo")


class AdapterKind(str, Enum):
    lora = "lora"
    qlora = "qlora"
    dora = "dora"
    none = "none"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class TrackingMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class OnError(str, Enum):
    error = "error"
    skip = "skip"


# Every loss TRL 1.16's DPOTrainer accepts (DPOConfig.loss_type).
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


@dataclass
class ModelConfig:
    """The base model. ``name_or_path`` is a local directory, a hub id, or ``embedded:smollm2-135m``."""

    name: str = "smollm2-135m"
    name_or_path: str = "embedded:smollm2-135m"
    revision: str | None = None
    dtype: DType = DType.auto  # auto: bf16 on CUDA (when supported), fp32 on CPU
    max_length: int = 256  # prompt + completion tokens
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # None: transformers' default (sdpa)
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    chat_template: str | None = None  # a Jinja template that replaces the tokenizer's


@dataclass
class AdapterConfig:
    """What is trained on top of the frozen base: LoRA, DoRA, QLoRA (4-bit base + LoRA) or nothing."""

    kind: AdapterKind = AdapterKind.lora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: model.lora_target_modules
    bits: int = 0  # 0: full precision base; 4 or 8: bitsandbytes quantized base
    quant_type: str = "nf4"  # nf4 | fp4 (4-bit only)
    double_quant: bool = True


@dataclass
class TrainConfig:
    lr: float = 5e-5
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    eval_batch_size: int = 8
    warmup: float = 0.0  # < 1: fraction of the steps; >= 1: number of steps
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 5
    eval_steps: int = 0  # 0: evaluate once, at the end
    gradient_checkpointing: bool | None = None  # None: on for CUDA, off on CPU
    packing: bool = False  # SFT only: padding-free best-fit packing
    completion_only_loss: bool = True  # SFT only: loss on the response tokens only
    num_workers: int = 0


@dataclass
class DataConfig:
    """Where the rows come from. ``train`` unset: the shipped ``reward_data`` set the stage needs."""

    name: str = "ifeval"  # shipped set used when train is unset: ifeval | tiny
    train: str | None = None  # file (.jsonl/.json/.parquet/.csv) or hub dataset name
    eval: str | None = None  # held-out file; unset: a fraction of train is held out
    eval_fraction: float = 0.05
    max_train_rows: int | None = None
    max_eval_rows: int | None = 64
    split: str = "train"  # split to read from a hub dataset
    on_error: OnError = OnError.error  # what to do with a malformed or over-long row


@dataclass
class TrackingConfig:
    mode: TrackingMode = TrackingMode.offline
    project: str = "align"
    entity: str | None = None
    group: str | None = None
    name: str | None = None  # default: <stage>-<timestamp>
    tags: list[str] = field(default_factory=list)
    dir: str | None = None  # default: the run directory


@dataclass
class SFTStageConfig:
    pass


@dataclass
class DPOStageConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # one of DPO_LOSS_TYPES, or several joined by '+' (e.g. sigmoid+sft)
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    init: str | None = None  # an SFT run directory: its adapter is the start AND the frozen reference
    precompute_ref_log_probs: bool = False


@dataclass
class AlignConfig:
    stage: str = MISSING
    seed: int = 42
    device: Device = Device.auto
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)


def register() -> None:
    cs = ConfigStore.instance()
    # conf/config.yaml starts from this schema, so every group file merged onto it
    # (conf/model/*.yaml, conf/adapter/*.yaml, ...) is checked against the dataclasses.
    ConfigStore.instance().store(name="align_schema", node=AlignConfig)


def dpo_loss_types(cfg: Any) -> list[str]:
    return [t.strip() for t in str(cfg.dpo.loss_type).split("+") if t.strip()]


def validate(cfg: Any) -> None:
    """Rules the schema's types cannot express. Raises AlignError naming the key."""
    if cfg.stage not in STAGES:
        raise AlignError(f"stage={cfg.stage!r} is not a stage; choose one of: {', '.join(STAGES)}")
    a = cfg.adapter
    if a.bits not in (0, 4, 8):
        raise AlignError(f"adapter.bits={a.bits} is not supported; use 0 (no quantization), 4 or 8")
    if a.kind == AdapterKind.qlora and a.bits == 0:
        raise AlignError("adapter=qlora needs adapter.bits=4 or 8")
    if a.kind == AdapterKind.none and a.bits:
        raise AlignError("adapter=none trains the full model, which cannot be quantized; set adapter.bits=0")
    if a.quant_type not in ("nf4", "fp4"):
        raise AlignError(f"adapter.quant_type={a.quant_type!r}: use nf4 or fp4")
    if a.kind != AdapterKind.none and a.r <= 0:
        raise AlignError(f"adapter.r={a.r} must be a positive rank")
    t = cfg.train
    if t.lr <= 0:
        raise AlignError(f"train.lr={t.lr} must be positive")
    if t.batch_size <= 0 or t.grad_accum <= 0 or t.eval_batch_size <= 0:
        raise AlignError("train.batch_size, train.grad_accum and train.eval_batch_size must be positive")
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs <= 0):
        raise AlignError("nothing to train: set train.max_steps > 0 or train.epochs > 0")
    if cfg.model.max_length < 16:
        raise AlignError(f"model.max_length={cfg.model.max_length} is too short (at least 16 tokens)")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise AlignError(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1)")
    if cfg.stage == "dpo":
        losses = dpo_loss_types(cfg)
        bad = [x for x in losses if x not in DPO_LOSS_TYPES]
        if not losses or bad:
            raise AlignError(
                f"dpo.loss_type={cfg.dpo.loss_type!r}: unknown loss {bad or ''}; choose from "
                f"{', '.join(DPO_LOSS_TYPES)} (combine with '+', e.g. sigmoid+sft)"
            )
        if cfg.dpo.loss_weights is not None and len(cfg.dpo.loss_weights) != len(losses):
            raise AlignError(
                f"dpo.loss_weights has {len(cfg.dpo.loss_weights)} weights for {len(losses)} losses"
            )
        if cfg.dpo.beta <= 0:
            raise AlignError(f"dpo.beta={cfg.dpo.beta} must be positive")
