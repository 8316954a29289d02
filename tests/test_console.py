"""align.console: the data passes of a stage draw one progress bar."""

from __future__ import annotations

import re

from datasets import Dataset

from align.console import close_data_bar, fold_data_bars


def bar_names(stderr: str) -> set[str]:
    """The descriptions of the tqdm bars drawn on ``stderr`` (``<desc>: <n>%|``)."""
    return set(re.findall(r"(?:^|[\r\n])([^\r\n:]+): +\d+%\|", stderr))


def test_datasets_passes_advance_one_bar(capsys, tmp_path):
    ds = Dataset.from_list([{"x": i} for i in range(30)])
    with fold_data_bars():
        ds.save_to_disk(str(tmp_path / "saved"))
        doubled = ds.map(lambda r: {"y": 2 * r["x"]}, desc="Tokenizing train dataset")
        kept = doubled.filter(lambda r: r["y"] % 3 == 0, desc="Dropping rows")
    err = capsys.readouterr().err
    assert kept["y"] == [y for y in range(0, 60, 2) if y % 3 == 0]  # the passes still work
    assert bar_names(err) == {"preparing data"}, err
    # its total is every row of the three passes, all done; the postfix names the last pass
    assert re.search(r"preparing data: 100%\|[^\r\n]*\b90/90\b[^\r\n]*Dropping rows", err), err
    # outside, datasets draws its own bars again
    ds.map(lambda r: r, desc="After")
    assert "After" in bar_names(capsys.readouterr().err)


def test_closing_the_bar_starts_a_new_one_for_later_passes(capsys):
    ds = Dataset.from_list([{"x": i} for i in range(10)])
    with fold_data_bars():
        ds.map(lambda r: r, desc="one")
        close_data_bar()  # what guard.train does before training
        first = capsys.readouterr().err
        ds.map(lambda r: r, desc="two")
    second = capsys.readouterr().err
    assert re.search(r"preparing data: 100%\|[^\r\n]*10/10", first), first
    assert re.search(r"preparing data: 100%\|[^\r\n]*10/10", second), second


def test_disabled_leaves_datasets_alone(capsys):
    ds = Dataset.from_list([{"x": i} for i in range(10)])
    with fold_data_bars(enabled=False):
        ds.map(lambda r: r, desc="own bar")
    assert bar_names(capsys.readouterr().err) == {"own bar"}
