"""Where a training run reports: OUT/metrics.jsonl (one JSON object per optimizer step), TensorBoard scalars, a
Weights & Biases run and the progress bar, owned by one object so the loop logs a record in one call. Only rank 0
writes; on other ranks every method is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.files import atomic_write, atomic_write_json, read_json

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_FILE = "wandb_run.json"  # {"id": ...}: a resumed run continues the same W&B run
# The scalars of a step record that go to TensorBoard (under train/); per-domain validation goes under val/.
_BOARD_SCALARS = ("loss", "ce", "aux", "z", "lr", "grad_norm", "tokens_per_s")


def _records(path: Path, text: str) -> list[tuple[str, dict]]:
    """(line, record) of every line of metrics.jsonl's `text`. A last line that is not a whole record was being
    written when the run stopped (killed, or a full disk) and is dropped; a damaged line before it is an error."""
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError
        except ValueError:  # json.JSONDecodeError is a ValueError
            if number == len(lines):
                break
            raise UpcycleError(f"{path} line {number} is not a step record; the file is damaged: delete that line (or "
                               "the whole file) and resume") from None
        records.append((line, record))
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records of steps after the checkpoint a run resumes from (they are redone and would appear twice), and a
    partial last line. The file is replaced atomically (files.atomic_write), so a failure while rewriting it (a full
    disk) leaves the old file whole."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept = "".join(line + "\n" for line, record in _records(path, text) if record["step"] <= last_step)
    if kept == text:
        return
    atomic_write(path, kept)


def wandb_record(record: dict) -> dict:
    """A metrics.jsonl record as W&B keys: train/... scalars (the step under train/step, the x axis of every chart, so
    a resumed run's repeated steps do not fight W&B's own step counter), val/DOMAIN, and per MoE layer
    expert_load/max_share/layer_I and .../min_share/layer_I."""
    out = {"train/step": record["step"]}
    for key in (*_BOARD_SCALARS, "tokens", "step_time_s"):
        if key in record:
            out[f"train/{key}"] = record[key]
    for domain, value in record.get("val", {}).items():
        out[f"val/{domain}"] = value
    for stat, values in (record.get("expert_load") or {}).items():
        for layer, value in enumerate(values):
            out[f"expert_load/{stat}/layer_{layer}"] = value
    return out


def _start_wandb(out: Path, settings, config: dict):
    """The W&B run of this training run: new, or (OUT/wandb_run.json exists: a resumed run) the same one again."""
    try:
        import wandb
    except ImportError:
        raise UpcycleError("logging.wandb needs the wandb package: pip install 'upcycle[wandb]'") from None
    id_file = out / WANDB_RUN_FILE
    run_id = read_json(id_file).get("id") if id_file.is_file() else None
    run = wandb.init(project=settings.project, entity=settings.entity, name=settings.name, tags=list(settings.tags),
                     group=settings.group, job_type=settings.job_type, dir=str(out), config=config,
                     id=run_id, resume="allow")
    if run_id is None:
        atomic_write_json(id_file, {"id": run.id})
    run.define_metric("train/step")
    run.define_metric("*", step_metric="train/step")
    return run


class MetricsLog:
    """metrics.jsonl + TensorBoard (when the optional package is installed) + a tqdm progress bar.

    Opening it on a resumed run first drops the records after `start_step`. Use as a context manager.
    """

    def __init__(self, out: Path, *, enabled: bool, start_step: int, max_steps: int, progress: bool,
                 tensorboard: bool, wandb=None, config: dict | None = None):
        self.file = self.board = self.bar = self.wandb = None
        if not enabled:
            return
        if wandb is not None:
            self.wandb = _start_wandb(out, wandb, config or {})
        self.path = out / METRICS_FILE
        truncate_metrics(self.path, start_step)
        self.file = open(self.path, "a", encoding="utf-8")
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
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as exc:  # a full disk: the error says which file (a bare write error names none)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        if self.board is not None:
            for key in _BOARD_SCALARS:
                if key in record:
                    self.board.add_scalar(f"train/{key}", record[key], record["step"])
            for domain, value in record.get("val", {}).items():
                self.board.add_scalar(f"val/{domain}", value, record["step"])
        if self.wandb is not None:
            self.wandb.log(wandb_record(record))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        for handle in (self.bar, self.board):
            if handle is not None:
                handle.close()
        if self.wandb is not None:
            run, self.wandb = self.wandb, None
            run.finish()
        if self.file is not None:
            file, self.file = self.file, None
            try:
                file.close()
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
