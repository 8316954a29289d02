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
from omegaconf import MISSING, DictConfig, OmegaConf

from align.errors import AlignError

STAGES = (
    "sft",
    "dpo",
    "rm",
    "ppo",
    "rlhf",
    "export",
    "eval",
    "grpo",
    "rloo",
    "classify",
    "kto",
    "orpo",
    "simpo",
)
# preference optimisers: their run directory holds a policy adapter trained on preferences
PREFERENCE_STAGES = ("dpo", "kto", "orpo", "simpo")
# stages whose output is a causal-LM policy (what stage=eval, export, ppo.policy and *.init take)
POLICY_STAGES = ("sft", *PREFERENCE_STAGES, "ppo", "grpo", "rloo")


class AdapterKind(str, Enum):
    lora = "lora"
    qlora = "qlora"
    dora = "dora"
    none = "none"
    freeze = "freeze"  # layer freezing: only the top adapter.train_layers blocks (+ final norm) train
    prefix = "prefix"  # peft prefix tuning (trainable key/value prefixes in every layer)
    prompt = "prompt"  # peft prompt tuning (trainable soft-prompt embeddings)
    ia3 = "ia3"  # peft IA3 (learned scaling vectors on keys, values and the MLP)


# the kinds that are LoRA adapters (PPO's shared-backbone roles, sampling's merge path)
LORA_KINDS = ("lora", "qlora", "dora")
# peft prompt-learning kinds: no base layer changes, virtual tokens through PeftModel.forward
PROMPT_LEARNING_KINDS = ("prefix", "prompt")
# the kinds of issue 13 and the stages they are supported (and tested) with
NEW_KINDS = ("freeze", "prefix", "prompt", "ia3")
NEW_KIND_TRAINING = ("sft", *PREFERENCE_STAGES, "rm", "classify")
NEW_KIND_STAGES = (*NEW_KIND_TRAINING, "eval", "export")
# stages that train on supervised (prompt + response) rows, where data.replay mixes general rows in
REPLAY_STAGES = ("sft",)


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Autocast(str, Enum):
    auto = "auto"  # bf16 where the hardware computes it natively (CPU: AVX512-BF16/AMX; CUDA: fp32 weights)
    bf16 = "bf16"  # bf16 autocast over fp32 weights even where it is emulated (slow, for checks)
    none = "none"


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


class OnCollapse(str, Enum):
    warn = "warn"  # warn once and log it; training goes on
    stop = "stop"  # stop with a message; the last good checkpoint is kept, no collapsed artifact


class OnNaN(str, Enum):
    stop = "stop"  # stop with a message naming the step; the last good checkpoint is kept
    skip = "skip"  # drop that step's update and go on (counted in train/skipped_nonfinite_steps)


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
    # adapter=freeze: train only the top N decoder blocks and the final norm (+ the LM head with
    # train_head=true; a classification head always trains). Everything below stays bit-identical.
    train_layers: int = 2
    train_head: bool = False
    # adapter=prefix / adapter=prompt: how many virtual tokens (prefix length / soft-prompt length)
    num_virtual_tokens: int = 20
    # adapter=prompt: initialise the soft prompt from this text's token embeddings (null: random)
    prompt_init: str | None = None


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
    # with gradient checkpointing: recompute only every n-th decoder layer (1: all layers, the
    # most memory saved; 2: half the layers, about half the saving for half the extra compute;
    # 0, stage=dpo's default: every 2nd layer on CPU with jemalloc, else every layer)
    checkpoint_every: int = 1
    autocast: Autocast = Autocast.auto  # bf16 mixed precision over fp32 weights (see README)
    group_by_length: bool = True  # batch rows of similar length together (less padding)
    packing: bool = False  # SFT only: padding-free best-fit packing
    completion_only_loss: bool = True  # SFT only: loss on the response tokens only
    num_workers: int = 0
    # after training, run stage=eval (eval.* keys) on this run's output, into its run dir
    eval_at_end: bool = False
    save_steps: int = 50  # checkpoint every N steps (0: only when interrupted); see resume=
    save_total_limit: int = 2  # keep the last K checkpoints
    on_nan: OnNaN = OnNaN.stop  # a non-finite loss or gradient: stop | skip the step
    # preference stages: the policy's log-prob of the chosen responses fell this many nats below
    # where it started (DPO, KTO: -rewards/chosen / beta) -> a collapse (see README); null: no check
    max_logp_drop: float | None = 10.0
    # the same for the reference-free stages (orpo, simpo), whose TRL trainers log the chosen
    # responses' log-prob per token: this many nats per token below the first logged value
    max_token_logp_drop: float | None = 1.0
    on_collapse: OnCollapse = OnCollapse.warn


@dataclass
class ColumnsConfig:
    """``data.columns.<canonical>=<column in the file>``: which file column holds each column a
    stage reads (e.g. ``data.columns.text=code data.columns.label=target``); null: the canonical name."""

    text: str | None = None
    label: str | None = None
    weight: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    margin: str | None = None
    constraints: str | None = None
    id: str | None = None


@dataclass
class DataConfig:
    """Where the rows come from. ``train`` unset: the shipped ``reward_data`` set the stage needs."""

    name: str = "ifeval"  # shipped set used when train is unset: ifeval | tiny
    train: str | None = None  # file (.jsonl/.json/.parquet/.csv) or hub dataset name
    eval: str | None = None  # held-out file; unset: a fraction of train is held out
    eval_fraction: float = 0.05
    max_train_rows: int | None = None
    max_eval_rows: int | None = 16
    # SFT: mix rows of this file (general data, e.g. reward_data/general_sft.jsonl) into training so
    # that they make data.replay_fraction of the training rows (seeded; reported in the summary)
    replay: str | None = None
    replay_fraction: float = 0.2
    split: str = "train"  # split to read from a hub dataset (or a local dataset directory)
    subset: str | None = None  # the hub dataset's subset (config name), as load_dataset(name, subset)
    on_error: OnError = OnError.error  # what to do with a malformed or over-long row
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)  # rename file columns (every stage)


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
    precompute_ref_log_probs: bool = True  # once per (reference, data), cached on disk across runs


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")  # TRL 1.16's KTOConfig.loss_type


@dataclass
class KTOStageConfig:
    """stage=kto (TRL's KTOTrainer): unpaired feedback (prompt, completion, label) or pairs,
    which are split into a desirable and an undesirable row each."""

    beta: float = 0.1
    loss_type: str = "kto"  # kto | apo_zero_unpaired
    desirable_weight: float = 1.0  # weigh the rarer label up (KTO paper, Eq. 8: ratio in [1, 4/3])
    undesirable_weight: float = 1.0
    init: str | None = None  # an SFT (or preference) run directory: the start AND the frozen reference
    precompute_ref_log_probs: bool = False  # reference pass over the data once, before training


@dataclass
class ORPOStageConfig:
    """stage=orpo (TRL's experimental ORPOTrainer): SFT loss + odds-ratio preference term, no reference."""

    beta: float = 0.1  # lambda of the ORPO paper: weight of the odds-ratio term
    init: str | None = None  # a run directory whose adapter is the starting policy


@dataclass
class SimPOStageConfig:
    """stage=simpo (TRL's experimental CPOTrainer, loss_type=simpo): length-normalised, reference-free."""

    beta: float = 2.0  # reward scale on the mean per-token log-prob (SimPO paper: 2.0-2.5)
    gamma: float = 1.0  # target reward margin (TRL's simpo_gamma; SimPO paper: gamma/beta ~0.5)
    cpo_alpha: float = 0.0  # weight of an NLL term on the chosen responses (CPO-SimPO); 0: plain SimPO
    label_smoothing: float = 0.0
    init: str | None = None  # a run directory whose adapter is the starting policy


@dataclass
class RMStageConfig:
    """Reward model: a LoRA (task SEQ_CLS) + scalar score head on the base, trained on pairs."""

    center_rewards_coefficient: float | None = None  # e.g. 0.01: pulls mean reward towards 0
    # an SFT run directory: the reward model's LoRA starts from its LoRA weights (InstructGPT's
    # RM starts from the SFT model), the score head from scratch; stage=rlhf sets its sft run
    init: str | None = None
    # the fresh score head's init: None = the model's own (normal, std = initializer_range, 0.02
    # for SmolLM2), or this std (0: zeros, every reward starts at 0 and the head learns its direction)
    head_init_std: float | None = None


class ClassifyLoss(str, Enum):
    ce = "ce"
    focal = "focal"


class Pooling(str, Enum):
    last = "last"  # the head reads each example's last real token (what transformers' own pooling does)
    mean = "mean"  # the head's output averaged over each example's tokens (= the head on mean-pooled states)


class Truncate(str, Enum):
    end = "end"  # keep the first model.max_length tokens
    middle = "middle"  # keep the head and the tail, drop the middle


@dataclass
class ClassifyStageConfig:
    """stage=classify: a causal LM + classification head on the last real token (docs/classify.md)."""

    loss: ClassifyLoss = ClassifyLoss.ce
    focal_gamma: float = 1.0  # loss=focal: (1 - p_true)^gamma * CE; 0 is plain cross-entropy
    class_weights: Any = None  # null | auto (inverse frequency) | [w_0, w_1, ...] (one per label)
    labels: list[str] | None = None  # label order (ids 0..K-1; binary: the 2nd is positive); null: sorted
    # several examples per sequence, block-diagonal attention; null (auto): on, except with
    # adapter=prefix/prompt, whose peft forward cannot pass the block-diagonal mask through
    packing: bool | None = None
    truncate: Truncate = Truncate.middle  # texts over model.max_length lose their end or their middle
    # last: the head on the last real token (exports as a plain AutoModelForSequenceClassification);
    # mean: averaged over the example's tokens (predictions need align; docs/classify.md)
    pooling: Pooling = Pooling.last
    # read the hidden states after this decoder layer (1..the model's layers): the layers above
    # it are dropped, neither run nor trained (a middle layer generalises better on the shipped
    # code-defect set; docs/classify.md); null: the last layer
    layer: int | None = None
    threshold: float | None = None  # binary: decision threshold; null: the F1-maximising one on eval
    predictions: bool = True  # write predictions.jsonl (and W&B ROC/PR plots) for the eval split


@dataclass
class PPOStageConfig:
    """PPO on one shared base with named LoRA adapters (policy, value, reward, reference).

    One PPO step: ``train.batch_size * train.grad_accum * num_mini_batches`` prompts per
    process are rolled out; ``train.max_steps`` is the number of PPO steps.
    """

    policy: str | None = None  # an sft/dpo/ppo run dir: policy starts there and it is the reference
    reward: str | None = None  # an rm run dir, or judge:<name> (judge:ifeval), or fn:<module>:<function>
    value_from_reward: bool = True  # initialise the value adapter + head from the reward model
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # k1 | k3 (http://joschu.net/blog/kl-approx.html)
    target_kl: float | None = None  # set: adaptive KL controller (Ziegler et al. 2019) towards it
    kl_horizon: int = 10000
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of completions without EOS
    whiten_rewards: bool = False
    reward_clip: float | None = None  # clip scores to [-reward_clip, reward_clip]
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 2
    num_mini_batches: int = 1
    sample_every: int = 5  # W&B table of prompts/completions every N steps (0: never)
    separate_models: bool = False  # benchmark baseline: four model copies (policy, ref, reward, value)


@dataclass
class EvalStageConfig:
    """stage=eval (and train.eval_at_end): a held-out alignment report. See docs/eval.md."""

    # a run dir (sft/dpo/ppo/grpo/rloo), a model dir or hub id, or base (model.*); or a list of
    # them, [base,<run a>,<run b>]: one side-by-side table on the same prompts (a str or list)
    model: Any = "base"
    baseline: str = "base"  # base: the same base model (adapters disabled), side by side; none: skip it
    reward: str | None = None  # an rm run dir: mean reward-model score and win-rate judged by it
    prompts: str | None = None  # prompts (+ constraints) file; None: reward_data/prompts_test.jsonl
    pairs: str | None = None  # preference pairs file; None: reward_data/pairs_test.jsonl
    max_prompts: int = 48  # 0: skip generation (judges, KL, length, reward)
    max_pairs: int = 64  # 0: skip preference accuracy
    max_new_tokens: int = 128
    batch_size: int = 0  # rows per generation / scoring batch; 0: sized by free memory (at most 64)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    samples_to_log: int = 16  # rows of the W&B table / report.md sample section
    dpo_beta: float | None = None  # implicit DPO reward scale; None: the evaluated run's dpo.beta
    # forgetting check on general data unrelated to training (docs/methods.md): perplexity of
    # held-out general text, KL(base || tuned) on the base's greedy answers, exact-match on short
    # answers the base gets right. general: a directory with general_text/prompts/qa.jsonl
    # (None: the shipped reward_data/); max_general: rows of each (0 skips the check)
    forgetting: bool = True
    general: str | None = None
    max_general: int = 32
    general_new_tokens: int = 48


@dataclass
class OnlineRLStageConfig:
    """What GRPO and RLOO share (TRL's GRPOTrainer / RLOOTrainer). ``train.batch_size`` counts
    completions: each step samples ``batch_size * grad_accum / num_generations`` prompts."""

    init: str | None = None  # an sft/dpo/... run dir: the policy starts there (and it is the reference)
    # judge:<name> | fn:<module>:<function> | <rm run dir>; several joined by '+'
    reward: str = "judge:ifeval"
    reward_weights: list[float] | None = None  # one per reward; None: all 1.0
    num_generations: int = 4  # completions per prompt (the group)
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0  # KL coefficient against the reference; 0: no reference pass
    num_iterations: int = 1
    epsilon: float = 0.2
    use_vllm: bool = False  # generate with vLLM (GPU, `pip install vllm`)
    vllm_mode: str = "colocate"  # colocate | server
    log_completions: bool = True  # W&B table of prompts, completions and rewards every logging step


@dataclass
class GRPOStageConfig(OnlineRLStageConfig):
    beta: float = 0.0  # TRL's default: no reference model (set e.g. 0.04 to penalise KL)
    loss_type: str = "dapo"  # grpo | dr_grpo | dapo | bnpo | cispo | sapo
    scale_rewards: str = "group"  # group | batch | none


@dataclass
class RLOOStageConfig(OnlineRLStageConfig):
    beta: float = 0.05  # TRL's default
    normalize_advantages: bool = False


def _rlhf_train(**kw: Any) -> Any:
    return field(default_factory=lambda: TrainConfig(**kw))


@dataclass
class RLHFStageConfig:
    """stage=rlhf runs sft -> rm -> ppo; each sub-stage takes its train.* from here
    (``rlhf.sft.max_steps=10``), its own keys from ``sft.*``/``rm.*``/``ppo.*``."""

    stages: list[str] = field(default_factory=lambda: ["sft", "rm", "ppo"])
    sft: TrainConfig = _rlhf_train(lr=2e-4, max_steps=24, batch_size=4, logging_steps=4)
    rm: TrainConfig = _rlhf_train(lr=3e-4, max_steps=48, batch_size=8, logging_steps=8)
    # rm and ppo as their own stages' defaults (conf/stage/rm.yaml, conf/stage/ppo.yaml; the
    # ppo.* keys are in conf/stage/rlhf.yaml); measured in docs/ppo.md "stage=rlhf"
    ppo: TrainConfig = _rlhf_train(
        lr=3e-4, max_steps=16, batch_size=8, logging_steps=1, gradient_checkpointing=True
    )
    # the reward model's LoRA starts from the sft sub-run's (rm.init), as InstructGPT does: the
    # chain then gained +9.5 points prompt-level over its sft run on 200 held-out prompts, +4.0
    # with the reward model from the base (docs/ppo.md, "PPO read the reward model at the wrong token")
    rm_from_sft: bool = True
    # data.train for one sub-stage (each needs its own row kind); None: data.train / data.name
    sft_data: str | None = None
    rm_data: str | None = None
    ppo_data: str | None = None


@dataclass
class AlignConfig:
    stage: str = MISSING
    resume: str | None = None  # a run directory (or auto: the latest of this stage) to continue
    seed: int = 42
    device: Device = Device.auto
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)
    rm: RMStageConfig = field(default_factory=RMStageConfig)
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)
    rlhf: RLHFStageConfig = field(default_factory=RLHFStageConfig)
    eval: EvalStageConfig = field(default_factory=EvalStageConfig)
    grpo: GRPOStageConfig = field(default_factory=GRPOStageConfig)
    rloo: RLOOStageConfig = field(default_factory=RLOOStageConfig)
    classify: ClassifyStageConfig = field(default_factory=ClassifyStageConfig)
    kto: KTOStageConfig = field(default_factory=KTOStageConfig)
    orpo: ORPOStageConfig = field(default_factory=ORPOStageConfig)
    simpo: SimPOStageConfig = field(default_factory=SimPOStageConfig)
    # stage=export: export.from=<run dir> (a dict: `from` is a Python keyword); see align/stages/export.py
    export: dict[str, Any] = field(
        default_factory=lambda: {"from": None, "push_to_hub": False, "hub_id": None, "private": True}
    )


# stage=dpo's default lr: 5e-4 trains a fresh adapter from the base in its 12 default steps; from
# an SFT adapter (dpo.init) that lr collapsed the policy within 40 steps (chosen and rejected
# log-probs both fell ~27 nats, greedy outputs "<<<<<<"), while 5e-5 stayed fluent and added
# instruction-level accuracy (README results table). conf/stage/dpo.yaml: ${align_dpo_lr:${dpo.init}}
DPO_LR_FROM_BASE = 5e-4
DPO_LR_FROM_INIT = 5e-5


def _dpo_lr(init: Any) -> float:
    return DPO_LR_FROM_INIT if init else DPO_LR_FROM_BASE


def register() -> None:
    # conf/config.yaml starts from this schema, so every group file merged onto it
    # (conf/model/*.yaml, conf/adapter/*.yaml, ...) is checked against the dataclasses.
    ConfigStore.instance().store(name="align_schema", node=AlignConfig)
    OmegaConf.register_new_resolver("align_dpo_lr", _dpo_lr, replace=True)


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
    if a.kind in LORA_KINDS and a.r <= 0:
        raise AlignError(f"adapter.r={a.r} must be a positive rank")
    validate_adapter(cfg)
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
    if cfg.data.get("replay"):
        if not 0.0 < cfg.data.replay_fraction < 1.0:
            raise AlignError(
                f"data.replay_fraction={cfg.data.replay_fraction} must be in (0, 1): the share of the "
                "training rows that come from data.replay (e.g. 0.2)"
            )
        if cfg.stage not in REPLAY_STAGES:
            raise AlignError(
                f"data.replay is for SFT-like stages ({', '.join(REPLAY_STAGES)}), not stage={cfg.stage}: "
                "general rows are supervised (prompt + response); drop data.replay"
            )
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
    if cfg.stage in ("kto", "orpo", "simpo"):
        validate_preference(cfg)
    if cfg.stage in ("ppo", "rlhf"):
        validate_ppo(cfg)
    if cfg.stage == "eval" or cfg.train.eval_at_end:
        validate_eval(cfg)
    if cfg.stage in ("grpo", "rloo"):
        validate_online_rl(cfg)
    if cfg.stage == "classify":
        validate_classify(cfg)
    if cfg.stage == "rlhf":
        order = ["sft", "rm", "ppo"]
        chosen = list(cfg.rlhf.stages)
        if (
            not chosen
            or any(x not in order for x in chosen)
            or chosen != sorted(set(chosen), key=order.index)
        ):
            raise AlignError(f"rlhf.stages={list(cfg.rlhf.stages)}: use an ordered subset of [sft, rm, ppo]")
        for name in cfg.rlhf.stages:
            t = cfg.rlhf[name]
            if t.lr <= 0 or t.batch_size <= 0 or t.grad_accum <= 0 or t.max_steps == 0:
                raise AlignError(
                    f"rlhf.{name}: lr, batch_size, grad_accum must be positive and max_steps != 0"
                )


def adapter_kind(adapter_cfg: Any) -> str:
    """``adapter.kind`` as a plain string (an AdapterKind in a structured config, a str otherwise)."""
    return str(getattr(adapter_cfg.kind, "value", adapter_cfg.kind))


def classify_packing(cfg: Any) -> bool:
    """``classify.packing`` as the run uses it: null (auto) is on, except with adapter=prefix/prompt."""
    if cfg.classify.packing is not None:
        return bool(cfg.classify.packing)
    return adapter_kind(cfg.adapter) not in PROMPT_LEARNING_KINDS


def validate_adapter(cfg: Any) -> None:
    """The adapter kinds of issue 13 (freeze, prefix, prompt, ia3): their keys and the
    combinations that cannot work, each named with what to use instead."""
    a, kind = cfg.adapter, adapter_kind(cfg.adapter)
    if kind not in NEW_KINDS:
        return
    stage = cfg.stage
    if kind == "freeze" and a.bits:
        raise AlignError(
            f"adapter=freeze with adapter.bits={a.bits}: layer freezing trains the top blocks' own weights, "
            "which cannot be stored in 4/8 bits; use adapter.bits=0, or adapter=qlora (LoRA on a 4-bit base)"
        )
    if kind != "freeze" and a.bits:
        raise AlignError(
            f"adapter={kind} with adapter.bits={a.bits}: align quantizes the base only under LoRA; "
            f"use adapter=qlora for a 4-bit base, or adapter={kind} with adapter.bits=0"
        )
    if stage in ("ppo", "rlhf"):
        raise AlignError(
            f"adapter={kind} with stage={stage}: PPO keeps policy, reference, value and reward as LoRA "
            "adapters on one shared base, which a "
            + ("prefix/soft prompt" if kind in PROMPT_LEARNING_KINDS else f"{kind} model")
            + " cannot join; use adapter=lora (or qlora/dora) for PPO"
            + (
                "; or export a freeze run (stage=export) and use its model as model.name_or_path"
                if kind == "freeze"
                else ""
            )
        )
    if stage not in NEW_KIND_STAGES:
        raise AlignError(
            f"adapter={kind} with stage={stage} is not supported (adapter={kind} works with stage="
            f"{', '.join(NEW_KIND_TRAINING)}); use adapter=lora, qlora, dora or none for stage={stage}"
        )
    if kind == "prefix" and stage in ("rm", "classify"):
        raise AlignError(
            f"adapter=prefix with stage={stage}: peft's prefix tuning for sequence classification needs a model "
            "forward that takes past_key_values, which transformers 5's *ForSequenceClassification models do "
            "not; use adapter=prompt (soft prompt) or adapter=ia3 for a small classifier"
        )
    if kind == "prompt" and stage == "rm":
        raise AlignError(
            "adapter=prompt with stage=rm: peft passes the soft prompt to the model as embeddings, so the "
            "reward head cannot find each row's last real token in a padded batch (it reads the last "
            "position, padding for shorter rows); use adapter=ia3 or adapter=lora for a reward model"
        )
    if kind == "freeze" and a.train_layers < 1:
        raise AlignError(
            f"adapter.train_layers={a.train_layers}: train at least the top block (1); "
            "adapter=none trains them all"
        )
    if kind in PROMPT_LEARNING_KINDS:
        if a.num_virtual_tokens < 1:
            raise AlignError(f"adapter.num_virtual_tokens={a.num_virtual_tokens} must be at least 1")
        if a.num_virtual_tokens >= cfg.model.max_length:
            raise AlignError(
                f"adapter.num_virtual_tokens={a.num_virtual_tokens} must be below "
                f"model.max_length={cfg.model.max_length}"
            )
        if stage == "sft" and cfg.train.packing:
            raise AlignError(
                f"adapter={kind} with train.packing=true: packed rows are separated by position ids, which "
                f"peft's {kind} tuning ignores; set train.packing=false (or use adapter=lora to pack)"
            )
        if stage == "classify" and cfg.classify.packing is True:  # asked for; auto turns it off
            raise AlignError(
                f"adapter={kind} with classify.packing=true: packed rows need block-diagonal attention, which "
                f"peft's {kind} tuning does not pass through; set classify.packing=false (or use adapter=lora)"
            )


def validate_preference(cfg: Any) -> None:
    """stage=kto / orpo / simpo."""
    key = cfg.stage
    g = cfg[key]
    if g.beta <= 0:
        raise AlignError(f"{key}.beta={g.beta} must be positive")
    if key == "kto":
        if g.loss_type not in KTO_LOSS_TYPES:
            raise AlignError(f"kto.loss_type={g.loss_type!r}: use {' or '.join(KTO_LOSS_TYPES)}")
        if g.desirable_weight <= 0 or g.undesirable_weight <= 0:
            raise AlignError("kto.desirable_weight and kto.undesirable_weight must be positive")
        if g.loss_type == "kto" and cfg.train.batch_size < 2:
            raise AlignError(
                f"train.batch_size={cfg.train.batch_size}: KTO estimates its KL term from the other rows of a "
                "batch, so it needs at least 2 (or kto.loss_type=apo_zero_unpaired)"
            )
    if key == "simpo":
        if g.cpo_alpha < 0:
            raise AlignError(f"simpo.cpo_alpha={g.cpo_alpha} must be >= 0 (0: plain SimPO)")
        if not 0 <= g.label_smoothing < 0.5:
            raise AlignError(f"simpo.label_smoothing={g.label_smoothing} must be in [0, 0.5)")


def validate_ppo(cfg: Any) -> None:
    p = cfg.ppo
    if p.reward is not None and not p.reward.strip():
        raise AlignError("ppo.reward is empty; give an rm run directory or judge:ifeval")
    needs_reward = cfg.stage == "ppo" or (cfg.stage == "rlhf" and "rm" not in cfg.rlhf.stages)
    if needs_reward and not p.reward:
        raise AlignError(
            "stage=ppo needs a reward: ppo.reward=<rm run dir> (from stage=rm) or ppo.reward=judge:ifeval"
        )
    if p.reward and p.reward.startswith("fn:") and p.reward.count(":") != 2:
        raise AlignError(f"ppo.reward={p.reward!r}: write fn:<module>:<function>")
    if cfg.adapter.kind == AdapterKind.none:
        raise AlignError("PPO shares one frozen base between named adapters; use adapter=lora, qlora or dora")
    if p.max_new_tokens <= 0:
        raise AlignError(f"ppo.max_new_tokens={p.max_new_tokens} must be positive")
    if p.max_new_tokens >= cfg.model.max_length:
        raise AlignError(
            f"ppo.max_new_tokens={p.max_new_tokens} must be below model.max_length={cfg.model.max_length}"
        )
    if p.temperature <= 0:
        raise AlignError(f"ppo.temperature={p.temperature} must be positive (sampling is required for PPO)")
    if not 0 < p.top_p <= 1:
        raise AlignError(f"ppo.top_p={p.top_p} must be in (0, 1]")
    if p.kl_coef < 0:
        raise AlignError(f"ppo.kl_coef={p.kl_coef} must be >= 0")
    if p.kl_estimator not in ("k1", "k3"):
        raise AlignError(f"ppo.kl_estimator={p.kl_estimator!r}: use k1 or k3")
    if p.target_kl is not None and p.target_kl <= 0:
        raise AlignError(f"ppo.target_kl={p.target_kl} must be positive (or null for a fixed kl_coef)")
    if p.kl_horizon <= 0:
        raise AlignError(f"ppo.kl_horizon={p.kl_horizon} must be positive")
    if not 0 <= p.gamma <= 1 or not 0 <= p.lam <= 1:
        raise AlignError(f"ppo.gamma={p.gamma} and ppo.lam={p.lam} must be in [0, 1]")
    if p.cliprange <= 0 or p.cliprange_value <= 0:
        raise AlignError("ppo.cliprange and ppo.cliprange_value must be positive")
    if p.vf_coef < 0:
        raise AlignError(f"ppo.vf_coef={p.vf_coef} must be >= 0")
    if p.ppo_epochs <= 0 or p.num_mini_batches <= 0:
        raise AlignError("ppo.ppo_epochs and ppo.num_mini_batches must be positive")
    if p.reward_clip is not None and p.reward_clip <= 0:
        raise AlignError(f"ppo.reward_clip={p.reward_clip} must be positive (or null)")
    if cfg.stage == "ppo" and cfg.train.max_steps <= 0:
        raise AlignError("stage=ppo counts PPO steps: set train.max_steps > 0")


def validate_eval(cfg: Any) -> None:
    e = cfg.eval
    specs = [e.model] if isinstance(e.model, str) or not hasattr(e.model, "__iter__") else list(e.model)
    if not specs or any(s is None or isinstance(s, dict | DictConfig) or not str(s).strip() for s in specs):
        raise AlignError(
            "eval.model is empty; give a run directory, a model directory or hub id, or base "
            "(or a list of them: eval.model=[base,<run a>,<run b>])"
        )
    if e.baseline not in ("base", "none"):
        raise AlignError(f"eval.baseline={e.baseline!r}: use base (side by side with the base model) or none")
    if e.max_prompts < 0 or e.max_pairs < 0:
        raise AlignError("eval.max_prompts and eval.max_pairs must be >= 0 (0 skips that part)")
    if e.max_prompts == 0 and e.max_pairs == 0:
        raise AlignError("eval.max_prompts=0 and eval.max_pairs=0: nothing to evaluate")
    if e.max_new_tokens <= 0:
        raise AlignError("eval.max_new_tokens must be positive")
    if e.batch_size < 0:
        raise AlignError("eval.batch_size must be positive, or 0 (sized by free memory)")
    if e.temperature < 0:
        raise AlignError(f"eval.temperature={e.temperature} must be >= 0 (0: greedy)")
    if not 0 < e.top_p <= 1:
        raise AlignError(f"eval.top_p={e.top_p} must be in (0, 1]")
    if e.max_general < 0 or e.general_new_tokens <= 0:
        raise AlignError(
            "eval.max_general must be >= 0 (0: no forgetting check) and eval.general_new_tokens > 0"
        )
    if e.samples_to_log < 0:
        raise AlignError(f"eval.samples_to_log={e.samples_to_log} must be >= 0")


def validate_online_rl(cfg: Any) -> None:
    import importlib.util

    key = cfg.stage
    g = cfg[key]
    specs = [x.strip() for x in str(g.reward).split("+") if x.strip()]
    if not specs:
        raise AlignError(f"{key}.reward is empty; give judge:ifeval, fn:<module>:<function> or an rm run dir")
    if g.reward_weights is not None and len(g.reward_weights) != len(specs):
        raise AlignError(f"{key}.reward_weights has {len(g.reward_weights)} weights for {len(specs)} rewards")
    if g.num_generations < 2:
        raise AlignError(f"{key}.num_generations={g.num_generations}: a group needs at least 2 completions")
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    if per_step % g.num_generations:
        raise AlignError(
            f"train.batch_size * train.grad_accum = {per_step} completions per step must be a multiple of "
            f"{key}.num_generations={g.num_generations} (train.batch_size counts completions, not prompts)"
        )
    if g.max_completion_length <= 0 or g.max_completion_length >= cfg.model.max_length:
        raise AlignError(
            f"{key}.max_completion_length={g.max_completion_length} must be positive and below "
            f"model.max_length={cfg.model.max_length}"
        )
    if g.temperature <= 0 or not 0 < g.top_p <= 1:
        raise AlignError(f"{key}.temperature must be > 0 and {key}.top_p in (0, 1] (sampling is required)")
    if g.beta < 0:
        raise AlignError(f"{key}.beta={g.beta} must be >= 0")
    if g.num_iterations <= 0:
        raise AlignError(f"{key}.num_iterations={g.num_iterations} must be positive")
    if g.vllm_mode not in ("colocate", "server"):
        raise AlignError(f"{key}.vllm_mode={g.vllm_mode!r}: use colocate or server")
    if g.use_vllm and importlib.util.find_spec("vllm") is None:
        raise AlignError(
            f"{key}.use_vllm=true needs vLLM, which is not installed: `pip install vllm` on a CUDA machine, "
            f"or set {key}.use_vllm=false (generation with transformers)"
        )
    if key == "grpo":
        if g.loss_type not in ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"):
            raise AlignError(f"grpo.loss_type={g.loss_type!r}: use grpo, dr_grpo, dapo, bnpo, cispo or sapo")
        if g.scale_rewards not in ("group", "batch", "none"):
            raise AlignError(f"grpo.scale_rewards={g.scale_rewards!r}: use group, batch or none")
    if cfg.adapter.bits and g.use_vllm:
        raise AlignError(
            f"{key}.use_vllm=true with a quantized base (adapter.bits) is not supported; use adapter=lora"
        )


def class_weights_spec(value: Any) -> str | list[float] | None:
    """``classify.class_weights`` as None, "auto" or a list of floats; AlignError otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        items = list(value) if not isinstance(value, str | int | float) else None
        weights = [float(x) for x in items] if items is not None else None
    except (TypeError, ValueError):
        weights = None
    if not weights or any(not (w > 0 and w < float("inf")) for w in weights):
        raise AlignError(
            f"classify.class_weights={value!r}: use auto (inverse class frequency), null, or a list of "
            "positive numbers, one per label (e.g. classify.class_weights=[1.0,9.0])"
        )
    return weights


def validate_classify(cfg: Any) -> None:
    c = cfg.classify
    if c.focal_gamma < 0:
        raise AlignError(f"classify.focal_gamma={c.focal_gamma} must be >= 0 (0 is cross-entropy)")
    weights = class_weights_spec(c.class_weights)
    if isinstance(weights, list) and c.labels is not None and len(weights) != len(c.labels):
        raise AlignError(
            f"classify.class_weights has {len(weights)} weights for {len(c.labels)} classify.labels"
        )
    if c.labels is not None:
        names = [str(x) for x in c.labels]
        if len(names) < 2 or len(set(names)) != len(names):
            raise AlignError(f"classify.labels={names}: give at least two distinct labels")
    if c.threshold is not None and not 0.0 < c.threshold < 1.0:
        raise AlignError(f"classify.threshold={c.threshold} must be in (0, 1), or null (tuned on eval)")
