"""Shared fixtures: a tiny random Llama with a locally trained tokenizer (no Hub), and
Hydra composition of align's real config with overrides."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The suite's answers are CPU answers (fp32 weights, exact log-prob equalities, one process per
# CPU rank), so it runs on the CPU on every machine: a GPU is hidden from it, from the processes it
# starts too. `ALIGN_TEST_CUDA=1 pytest tests/test_cuda.py` runs the CUDA checks on a GPU machine.
if os.environ.get("ALIGN_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Tests never touch the user's cache, W&B account or the network.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a of to and in is it that for on with as was be by this are or from at an which have not "
    "water bees honey river bicycle history ocean forest mountain city light sound energy plants "
    "animals people music science rain clouds sun moon stars earth wind fire ice snow summer winter "
    "good bad yes no answer question list json key value end start word words sentence sentences "
    "lowercase uppercase capital letters commas bullet points paragraph keyword phrase include"
).split()


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 20))]
        line = " ".join(words)
        lines.append(line.capitalize() + rng.choice([".", "!", "?", ", and more."]))
    data_dir = REPO / "reward_data"
    for name in ("tiny_pairs.jsonl", "tiny_sft.jsonl"):
        p = data_dir / name
        if p.is_file():
            lines += [json.dumps(json.loads(x)) for x in p.read_text().splitlines() if x.strip()]
    return lines


def build_tiny_model(path: Path, *, vocab_size: int = 512) -> Path:
    """A 2-layer random Llama and a byte-level BPE tokenizer trained on a small corpus.
    The tokenizer has ChatML markers in its vocabulary but no chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>", bos_token=None, unk_token=None
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=0.1,  # lets a LoRA-only model move its logits by several nats
    )
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def compose(*overrides: str):
    """align's real Hydra config with ``overrides``, as the CLI would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from align.__main__ import config_dir
    from align.config import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


def tiny_overrides(model_dir: Path, *extra: str) -> list[str]:
    """Overrides that point a stage at the tiny model and keep it fast on 2 cores."""
    return [
        f"model.name_or_path={model_dir}",
        "model.name=tiny-llama",
        "model.max_length=128",
        "model.lora_target_modules=[all-linear]",
        "tracking=disabled",
        "train.logging_steps=1",
        *extra,
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def separable_pairs(path: Path, topics: list[str], n: int, seed: int) -> Path:
    """Preference pairs a tiny model learns and generalises: chosen says 'good ... yes',
    rejected says 'bad ... no', about a topic drawn from ``topics``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        t = rng.choice(topics)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Tell me about {t}."}],
                "chosen": [{"role": "assistant", "content": f"good answer about {t} yes"}],
                "rejected": [{"role": "assistant", "content": f"bad answer about {t} no"}],
            }
        )
    return write_jsonl(path, rows)


def compress(raw: bytes, suffix: str) -> bytes:
    """``raw`` compressed as a file named ``*<suffix>`` would be (.gz, .bz2, .xz or .zst)."""
    import bz2
    import gzip
    import lzma

    if suffix == ".zst":
        import pyarrow as pa

        out = pa.BufferOutputStream()
        with pa.CompressedOutputStream(out, "zstd") as f:
            f.write(raw)
        return out.getvalue().to_pybytes()
    return {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix](raw)
