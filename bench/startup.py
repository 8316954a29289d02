"""CLI start-up time: `python -m align --cfg job` and `python -m align --help`.

Baseline in the same run: `python -c pass` (the interpreter alone). Last line:
`cli_startup_s: <median seconds of --cfg job>`.
"""

from __future__ import annotations

import argparse
import subprocess
import time

from _common import PY, REPO, median, print_table


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    cases = {
        "python -c pass (baseline)": [PY, "-c", "pass"],
        "python -m align --cfg job": [PY, "-m", "align", "--cfg", "job"],
        "python -m align --help": [PY, "-m", "align", "--help"],
    }
    times = {k: [] for k in cases}
    for _ in range(args.reps):  # alternate the cases so drift hits all of them alike
        for name, cmd in cases.items():
            times[name].append(timed(cmd))
    base = median(times["python -c pass (baseline)"])
    rows = [
        {"command": k, "median_s": f"{median(v):.3f}", "x_interpreter": f"{median(v) / base:.1f}"}
        for k, v in times.items()
    ]
    print_table(rows, ["command", "median_s", "x_interpreter"])
    print(f"cli_startup_s: {median(times['python -m align --cfg job']):.3f}")


if __name__ == "__main__":
    main()
