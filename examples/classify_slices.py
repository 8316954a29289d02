"""Held-out ROC AUC of a stage=classify run (binary) per slice of the data: per language,
category and template of the shipped code-defect set, or per any column of your own file.

    .venv/bin/python examples/classify_slices.py outputs/classify/<time>
    .venv/bin/python examples/classify_slices.py <run> --data val.jsonl --by team,repo

Joins the run's ``predictions.jsonl`` (``id``, ``label_id``, ``score``) with the held-out rows
by ``id`` (the shipped sets' ``id`` column; for your own file, the column the run used as
``id``). ``--data`` defaults to the held-out file the run scored (its artifact.json). Where the
overall ROC AUC hides a slice the model gets backwards (AUC < 0.5), it shows here.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def held_out_file(run: Path) -> Path:
    """The held-out file the run scored, as its artifact.json records it (what stage=eval reads)."""
    from align import artifacts
    from align.errors import AlignError

    try:
        art = artifacts.read(run, key="run", expect_stage=("classify",))
    except AlignError as e:
        raise SystemExit(str(e)) from None
    source = art.manifest.get("data", {}).get("eval")
    if not source:
        raise SystemExit(f"{run}: its held-out rows were split from data.train; pass --data <file>")
    return Path(source)


def main() -> None:
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a stage=classify run directory")
    ap.add_argument("--data", type=Path, default=None, help="held-out JSONL with an id column")
    ap.add_argument("--by", default="language,category,template", help="comma-separated columns")
    args = ap.parse_args()
    data = args.data or held_out_file(args.run)
    rows = {r["id"]: r for r in map(json.loads, data.read_text().splitlines()) if r}
    preds = [json.loads(line) for line in (args.run / "predictions.jsonl").read_text().splitlines()]
    missing = [p["id"] for p in preds if p["id"] not in rows]
    if missing:
        raise SystemExit(f"{len(missing)} predictions have no row in {data} (first: {missing[0]})")
    print(f"{args.run} on {data}: {len(preds)} rows")
    print("| slice | rows | positive | ROC AUC |\n|---|---:|---:|---:|")
    for col in args.by.split(","):
        groups: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for p in preds:
            groups[str(rows[p["id"]].get(col))].append((p["label_id"], p["score"]))
        for name, pairs in sorted(groups.items()):
            y = [a for a, _ in pairs]
            auc = roc_auc_score(y, [s for _, s in pairs]) if len(set(y)) == 2 else float("nan")
            print(f"| {col}={name} | {len(pairs)} | {sum(y)} | {auc:.3f} |")


if __name__ == "__main__":
    main()
