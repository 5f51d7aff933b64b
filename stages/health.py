"""Stage health: the checks of tnd/health.py on what the other stages wrote.

Reads data/prepared/stats.json, metrics/reward.json, metrics/eval.json and plots/train.csv (and
the params the run was asked for); writes metrics/health.json (a DVC metric: `warnings`, one
true / false / null per check, so `dvc exp show` lists them, and the messages) and prints one
`warning: health: <check>: ...` line per check that fired (not those in health.ignore). With
health.strict, a fired check fails the stage with exit code 2 once metrics/health.json is written.
The stage trains nothing: it reruns in a second when a param it reads or an input changes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from tnd.config import Params
from tnd.errors import TndError
from tnd.health import report, run_checks
from tnd.io import atomic_write_json, read_csv, read_json
from tnd.tracking import Tracker

from stages.common import METRICS, PLOTS, PREPARED, run_stage


def _json(path: Path) -> Optional[dict]:
    """The file's object, or None when it is missing (its checks are then reported as not applicable)."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError:
        raise TndError(f"{path}: not valid JSON; rerun the stage that writes it (dvc repro)") from None


def _csv_rows(path: Path) -> list[dict]:
    return read_csv(path) if path.is_file() else []


def health(params: Params, run: Tracker) -> None:
    checks = run_checks(
        params,
        stats=_json(Path(PREPARED) / "stats.json"),
        reward=_json(Path(METRICS) / "reward.json"),
        evaluation=_json(Path(METRICS) / "eval.json"),
        train_rows=_csv_rows(Path(PLOTS) / "train.csv"),
    )
    ignore = set(params.health.ignore)
    result = report(checks, ignore)
    atomic_write_json(Path(METRICS) / "health.json", result)
    run.log_metrics({"warnings": result["warnings"], **{c.name: float(c.warn) for c in checks if c.warn is not None}})
    run.log_table([{"check": c.name, "warn": c.warn, "message": c.message} for c in checks], "health_checks.json")
    fired = [c for c in checks if c.warn and c.name not in ignore]
    for check in fired:
        print(f"warning: health: {check.name}: {check.message}", file=sys.stderr, flush=True)
    quiet = sum(c.warn is False for c in checks)
    skipped = [c.name for c in checks if c.warn is None]
    print(f"health: {len(fired)} warning(s), {quiet} check(s) quiet"
          + (f", not applicable: {', '.join(skipped)}" if skipped else "")
          + (f", ignored: {', '.join(result['ignored'])}" if result["ignored"] else ""))
    if fired and params.health.strict:
        raise TndError(
            f"health: {len(fired)} check(s) fired with health.strict: true ({', '.join(c.name for c in fired)}); "
            "see the warnings above, metrics/health.json and docs/pipeline.md 'Health checks'; fix the run, list a check in "
            "health.ignore, or set health.strict: false"
        )


def main(argv: list[str] | None = None) -> None:
    run_stage("health", health, argv)


if __name__ == "__main__":
    main()
