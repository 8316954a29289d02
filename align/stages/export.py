"""Export: a run's adapter merged into its base -> a standalone Hugging Face model directory.

    python -m align stage=export export.from=outputs/dpo/<timestamp>

writes ``<run dir>/model/``: safetensors weights, tokenizer with its chat template,
generation config, and a model card (README.md) with the lineage of every stage that led
to it (followed through the artifact.json links), its data and its key metrics. A 4-bit
base is reloaded unquantized in the run's dtype before merging. ``export.push_to_hub=true
export.hub_id=<user>/<name>`` uploads it when Hugging Face credentials are available.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align import artifacts, backbone, runs
from align.config import POLICY_STAGES, PROMPT_LEARNING_KINDS
from align.errors import AlignError
from align.training import StageContext

MODEL_DIR = "model"
CAUSAL_STAGES = (*POLICY_STAGES, "rlhf")
KEY_METRICS = ("eval/", "train/loss", "train/global_step", "train/reward")


def _run_config(art: artifacts.Artifact) -> Any:
    from omegaconf import OmegaConf

    from align.config import AlignConfig

    path = art.run_dir / "config.yaml"
    if not path.is_file():
        raise AlignError(f"export.from={art.run_dir}: no config.yaml beside artifact.json; was it moved?")
    return OmegaConf.merge(OmegaConf.structured(AlignConfig), OmegaConf.load(path))


def lineage(art: artifacts.Artifact, seen: set[str] | None = None) -> list[artifacts.Artifact]:
    """This run and every earlier run it names (dpo.init, ppo policy/reward, ...), newest first."""
    seen = seen if seen is not None else set()
    if str(art.run_dir.resolve()) in seen:
        return []
    seen.add(str(art.run_dir.resolve()))
    out = [art]
    for value in (art.manifest.get("data") or {}).values():
        if isinstance(value, str) and (Path(value) / artifacts.MANIFEST).is_file():
            try:
                out += lineage(artifacts.read(value, key="lineage"), seen)
            except AlignError:
                continue
    return out


def model_card(art: artifacts.Artifact, chain: list[artifacts.Artifact], hub_id: str | None) -> str:
    from align.secrets import redact_text

    base = art.manifest["base_model"]
    title = hub_id or f"{base['name']}-{art.stage}"
    lines = [
        "---",
        f"base_model: {base['name_or_path']}"
        if "/" in base["name_or_path"]
        else f"# base: {base['name_or_path']}",
        "library_name: transformers",
        "tags: [align, " + ", ".join(sorted({a.stage for a in chain})) + "]",
        "---",
        "",
        f"# {title}",
        "",
        f"`{base['name_or_path']}` with the {art.manifest['adapter'].get('kind', 'lora')} adapter of an "
        f"align `stage={art.stage}` run "
        + (
            "saved beside it (not mergeable; see How to load it)"
            if art.adapter_kind in PROMPT_LEARNING_KINDS
            else "merged in"
        )
        + " (exported by `python -m align stage=export`).",
        "",
        "## Lineage",
        "",
        "Oldest first; each stage started from the one before it.",
        "",
    ]
    for n, a in enumerate(reversed(chain), start=1):
        m, d = a.manifest, a.manifest.get("data") or {}
        ad = m.get("adapter") or {}
        lines += [
            f"### {n}. stage={a.stage}",
            "",
            f"- run: `{a.run_dir}` ({m.get('created', '?')}), seed {m.get('seed')}, git {m.get('git_revision')}",
            f"- adapter: {ad.get('kind')} r={ad.get('r')} alpha={ad.get('alpha')} bits={ad.get('bits')}",
            f"- data: train `{d.get('train')}` ({d.get('train_rows')} rows), held-out `{d.get('eval')}` "
            f"({d.get('eval_rows')} rows)",
        ]
        links = {k: v for k, v in d.items() if k not in ("train", "eval", "train_rows", "eval_rows") and v}
        if links:
            lines.append("- " + ", ".join(f"{k}: `{v}`" for k, v in links.items()))
        metrics = {
            k: v
            for k, v in (m.get("metrics") or {}).items()
            if k.startswith(KEY_METRICS) and not any(x in k for x in ("runtime", "per_second", "num_tokens"))
        }
        if metrics:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [
                f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
            ]
        lines.append("")
    versions = art.manifest.get("versions") or {}
    lines += ["## Framework versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return redact_text("\n".join(lines), keep_git_sha=True)


def _push(out: Path, hub_id: str | None, private: bool) -> str:
    if not hub_id:
        raise AlignError("export.push_to_hub=true needs export.hub_id=<user or org>/<model name>")
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise AlignError(
            "export.push_to_hub=true needs Hugging Face credentials: run `hf auth login` (or set HF_TOKEN); "
            f"the model is saved in {out} either way"
        )
    try:
        api = HfApi()
        api.create_repo(hub_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=hub_id, commit_message="align export")
    except Exception as e:
        raise AlignError(
            f"export.push_to_hub: uploading to {hub_id} failed ({e}); the model is in {out}"
        ) from None
    return f"https://huggingface.co/{hub_id}"


def run(ctx: StageContext) -> dict[str, float]:
    e = ctx.cfg.export
    src = e.get("from")
    if not src:
        raise AlignError(
            "stage=export needs export.from=<run dir> (the output of stage=sft, dpo, ppo, rm, ...)"
        )
    art = artifacts.read(src, key="export.from")
    if art.adapter_dir is None:
        raise AlignError(f"export.from={src}: stage={art.stage} has no trained weights to export")
    task = "seq_cls" if art.stage in ("rm", "classify") else "causal_lm"
    classifier = art.manifest.get("data", {}).get("classifier") or {}
    labels = classifier.get("labels") or []
    num_labels = len(labels) if art.stage == "classify" else 1
    pooling = classifier.get("pooling", "last")
    if art.stage == "classify" and pooling != "last":
        raise AlignError(
            f"export.from={src}: this classifier was trained with classify.pooling={pooling}; "
            "AutoModelForSequenceClassification reads the last token, so an exported model would predict "
            f"differently. Score files with `python -m align stage=eval eval.model={art.run_dir} "
            "data.eval=<file>`, or retrain with classify.pooling=last to export"
        )
    if art.stage == "classify" and classifier.get("layer") is not None:
        raise AlignError(
            f"export.from={src}: this classifier reads decoder layer {classifier['layer']} "
            "(classify.layer), not the base's last; export writes the whole base, so it would predict "
            f"differently. Score files with `python -m align stage=eval eval.model={art.run_dir} "
            "data.eval=<file>`"
        )
    if art.adapter_kind in PROMPT_LEARNING_KINDS:
        return _export_unmergeable(ctx, art, task)
    model, tokenizer = backbone.merged_model(_run_config(art), art.adapter_dir, task, num_labels=num_labels)
    if art.stage == "classify":  # the label names travel with the model (config.id2label)
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    if task == "causal_lm" and model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    chain = lineage(art)
    out = ctx.run_dir / MODEL_DIR
    auto = "AutoModelForSequenceClassification" if task == "seq_cls" else "AutoModelForCausalLM"
    url = None
    if runs.main_process():
        with artifacts.atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(art, chain, e.get("hub_id")), encoding="utf-8")
        if e.get("push_to_hub"):
            url = _push(out, e.get("hub_id"), bool(e.get("private", True)))
        artifacts.write_manifest(
            ctx.run_dir,
            stage="export",
            cfg=_run_config(art),
            adapter_path=None,
            data={"from": str(art.run_dir), "model": MODEL_DIR, "lineage": [str(a.run_dir) for a in chain]},
            metrics={},
            tracking=ctx.tracker.info | {"mode": ctx.tracker.mode},
        )
        print(
            f"\nalign: stage=export finished\n  model    {out}  (from stage={art.stage} run {art.run_dir})\n"
            f"  card     {out / 'README.md'}\n  load it  {auto}.from_pretrained({str(out)!r})"
            + (f"\n  hub      {url}" if url else ""),
            flush=True,
        )
    return {}


def loader_note(art: artifacts.Artifact, task: str, out: Path) -> str:
    """How to load a prefix/prompt-tuning export: the base plus the saved virtual tokens."""
    auto = "AutoModelForSequenceClassification" if task == "seq_cls" else "AutoModelForCausalLM"
    kind = art.adapter_kind
    return "\n".join(
        [
            "## How to load it",
            "",
            f"{kind} tuning adds {art.manifest['adapter'].get('num_virtual_tokens')} virtual tokens at run time "
            "(inside peft's forward and generate); they cannot be merged into the weights, so this directory "
            "holds the trained peft adapter and the tokenizer, not a standalone model. Load the base and the "
            "adapter:",
            "",
            "```python",
            f"from transformers import {auto}, AutoTokenizer",
            "from peft import PeftModel",
            "",
            f"base = {auto}.from_pretrained({art.base_model!r})  # the base this run trained on",
            f"model = PeftModel.from_pretrained(base, {str(out)!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})",
            "```",
            "",
            "Generate with `model.generate(...)` (peft's, which adds the virtual tokens).",
            "",
        ]
    )


def _export_unmergeable(ctx: StageContext, art: artifacts.Artifact, task: str) -> dict[str, float]:
    """Prefix / prompt tuning: the adapter and tokenizer, with a model card that says how to load them."""
    import shutil

    out = ctx.run_dir / MODEL_DIR
    chain = lineage(art)
    e = ctx.cfg.export
    if runs.main_process():
        with artifacts.atomic_dir(out) as tmp:
            for f in art.adapter_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            card = model_card(art, chain, e.get("hub_id"))
            (tmp / "README.md").write_text(card + "\n" + loader_note(art, task, out), encoding="utf-8")
        url = _push(out, e.get("hub_id"), bool(e.get("private", True))) if e.get("push_to_hub") else None
        artifacts.write_manifest(
            ctx.run_dir,
            stage="export",
            cfg=_run_config(art),
            adapter_path=None,
            data={
                "from": str(art.run_dir),
                "model": MODEL_DIR,
                "merged": False,
                "lineage": [str(a.run_dir) for a in chain],
            },
            metrics={},
            tracking=ctx.tracker.info | {"mode": ctx.tracker.mode},
        )
        print(
            f"\nalign: stage=export finished\n  adapter  {out}  ({art.adapter_kind} tuning of stage={art.stage} run "
            f"{art.run_dir}; not mergeable: saved as a peft adapter)\n  card     {out / 'README.md'} (how to load it)"
            + (f"\n  hub      {url}" if url else ""),
            flush=True,
        )
    return {}
