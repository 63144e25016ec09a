"""Where a training run reports: OUT/metrics.jsonl (one JSON object per optimizer step), TensorBoard scalars and the
progress bar, owned by one object so the loop logs a record in one call. Only rank 0 writes; on other ranks every
method is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# The scalars of a step record that go to TensorBoard (under train/); per-domain validation goes under val/.
_BOARD_SCALARS = ("loss", "ce", "aux", "z", "lr", "grad_norm", "tokens_per_s")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records of steps after the checkpoint a run resumes from: they are redone and would appear twice."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLog:
    """metrics.jsonl + TensorBoard (when the optional package is installed) + a tqdm progress bar.

    Opening it on a resumed run first drops the records after `start_step`. Use as a context manager.
    """

    def __init__(self, out: Path, *, enabled: bool, start_step: int, max_steps: int, progress: bool,
                 tensorboard: bool):
        self.file = self.board = self.bar = None
        if not enabled:
            return
        path = out / METRICS_FILE
        truncate_metrics(path, start_step)
        self.file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.board = SummaryWriter(str(out / TENSORBOARD_DIR))
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        """Append one step's record (it holds "step"; "val" maps domain -> loss on validation steps)."""
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key in _BOARD_SCALARS:
                if key in record:
                    self.board.add_scalar(f"train/{key}", record[key], record["step"])
            for domain, value in record.get("val", {}).items():
                self.board.add_scalar(f"val/{domain}", value, record["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        for handle in (self.bar, self.board, self.file):
            if handle is not None:
                handle.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
