"""How far a piece of the study has got, from its runs' files: what scripts/gpu_piece.sh writes beside the piece's
archive while it runs, so that a piece stopped at a device's time limit still sends back its measured speed.

    python scripts/piece_progress.py runs/pieces/piece-1 --elapsed 312 --out $OUT/piece-1-progress.json

Per run (arm, seed): finished or not, the optimizer steps taken (the stable run and every decay branch), the tokens
they trained, the seconds spent inside those steps, the median tokens per second, and the evaluations written. With
the elapsed wall time this splits a piece's time into training and the rest (start-up, evaluation, checkpoints),
which is what the pieces' sizes need (docs/experiments/replication/pieces.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from upcycle.files import atomic_write_json


def _steps(metrics: Path) -> dict[int, dict]:
    """The last record of each step of a metrics.jsonl (a resumed run may repeat steps); a torn last line is skipped."""
    records = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "step_time_s" in record:
            records[record["step"]] = record
    return records


def progress(piece: Path, elapsed_s: float | None = None) -> dict:
    runs = []
    for unit in sorted(piece.glob("arms/*/seed_*")):
        main = _steps(unit / "run" / "metrics.jsonl") if (unit / "run" / "metrics.jsonl").is_file() else {}
        steps = list(main.values())
        for metrics in sorted(unit.glob("budgets/*/run/metrics.jsonl")):
            # a decay branch starts with a copy of the stable run's records up to where it left it: not its steps
            steps += [r for step, r in _steps(metrics).items() if main.get(step) != r]
        rates = [s["tokens_per_s"] for s in steps if s.get("tokens_per_s")]
        runs.append({"arm": unit.parent.name, "seed": int(unit.name.removeprefix("seed_")),
                     "done": (unit / "arm.json").is_file(), "steps": len(steps),
                     # "tokens" is the count since the run began: one step trains tokens / step of them
                     "tokens": int(sum(s["tokens"] // s["step"] for s in steps if s.get("tokens") and s["step"])),
                     "training_seconds": round(sum(s["step_time_s"] for s in steps), 2),
                     "median_tokens_per_s": round(statistics.median(rates)) if rates else None,
                     "evaluations": len(list(unit.glob("measure/*.json")))})
    training = sum(r["training_seconds"] for r in runs)
    # elapsed_seconds is the wall time of this invocation of gpu_piece.sh: on a fresh machine, the piece's; a re-run
    # that finds runs already finished counts their steps but not the time they took
    return {"elapsed_seconds": elapsed_s, "runs": runs, "done": bool(runs) and all(r["done"] for r in runs),
            "tokens": sum(r["tokens"] for r in runs), "training_seconds": round(training, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("piece", type=Path, help="the piece's directory (runs/pieces/piece-N)")
    parser.add_argument("--elapsed", type=float, default=None, help="wall seconds since the piece started")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (atomically) instead of stdout")
    args = parser.parse_args(argv)
    record = progress(args.piece, args.elapsed)
    if args.out is None:
        json.dump(record, sys.stdout, indent=2)
        print()
    else:
        atomic_write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
