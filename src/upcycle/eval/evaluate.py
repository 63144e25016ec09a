"""`upcycle eval`: per-domain validation loss and perplexity of a dense or MoE checkpoint, plus an optional bridge to
lm-evaluation-harness.

The loss is scored on the fixed validation sequences of a prepared data directory (`data.validation_batches`: the
same tokens for every checkpoint and every run), so numbers from different models and training steps compare directly.
Each domain's loss is token-weighted: the summed next-token cross-entropy of all its scored tokens divided by their
count (not a mean of per-batch means, which would over-weight a short last batch). Perplexity is exp(loss).

lm-eval (the optional `eval` extra, `pip install 'upcycle[eval]'`) scores the model as a transformers model object;
`upcycle_continuations`, a small local task shipped in `upcycle/assets/lm_eval/`, runs offline.

Run: `upcycle eval MODEL_DIR --data DATA_DIR [--json-output] [--lm-eval-tasks upcycle_continuations]`.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from upcycle.data.prepare import check_data_fits, read_metadata, validation_batches
from upcycle.errors import UpcycleError
from upcycle.model.hf import as_hf_directory, check_model_dir, load_model

SHIPPED_TASK = "upcycle_continuations"
_TASK_DIR = Path(__file__).parents[1] / "assets" / "lm_eval"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# --------------------------------------------------------------------------------------------------------------------
# Math


def summed_next_token_loss(logits_BTV: Tensor, labels_BT: Tensor) -> tuple[float, int]:
    """(sum of next-token cross-entropies, number of tokens); labels are already shifted.

    Sums rather than means so that batches of different sizes and domains combine exactly. fp32 log-softmax: in bf16
    the small probabilities the loss depends on are lost.
    """
    # (B, T, V) -> (B*T, V)
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1]).float()
    total = F.cross_entropy(logits_NV, labels_BT.reshape(-1), reduction="sum")
    return float(total), labels_BT.numel()


def perplexity(loss: float) -> float:
    """exp(loss), or inf where exp overflows (a loss above ~709 nats only comes from a broken model)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def domain_result(loss_sum: float, num_tokens: int, num_sequences: int) -> dict:
    """Token-weighted mean loss and perplexity of one domain; loss None when nothing could be scored."""
    loss = loss_sum / num_tokens if num_tokens else None
    return {"loss": loss, "perplexity": perplexity(loss) if loss is not None else None, "tokens": num_tokens,
            "sequences": num_sequences}


# --------------------------------------------------------------------------------------------------------------------
# I/O


DEFAULT_SEQ_LEN = 256


@torch.no_grad()
def evaluate(
    model_path: str | Path,
    data_dir: str | Path,
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_sequences: int = 64,
    domains: Sequence[str] | None = None,
) -> dict:
    """Per-domain validation loss (nats per token) and perplexity of a checkpoint, in fp32, on sequences of `seq_len`
    tokens (default: DEFAULT_SEQ_LEN, or the model's max_seq_len when that is shorter; a longer one is refused).

    Returns {"model", "data", "seq_len", "max_sequences", "domains": {name: {"loss", "perplexity", "tokens",
    "sequences"}}, "overall": {...}}; "overall" weights every scored token equally, across domains.
    """
    path = check_model_dir(model_path)
    data_dir = Path(data_dir).expanduser()
    read_metadata(data_dir)
    model = load_model(path).eval()
    seq_len = min(DEFAULT_SEQ_LEN, model.config.max_seq_len) if seq_len is None else seq_len
    check_data_fits(data_dir, vocab_size=model.config.vocab_size, max_seq_len=model.config.max_seq_len,
                    seq_len=seq_len, seq_len_name="--seq-len")
    batches = validation_batches(data_dir, seq_len=seq_len, batch_size=batch_size, max_sequences=max_sequences,
                                 domains=domains)
    results = score_domains(model, batches)
    total_sum = sum(r["loss"] * r["tokens"] for r in results.values() if r["tokens"])
    total_tokens = sum(r["tokens"] for r in results.values())
    total_sequences = sum(r["sequences"] for r in results.values())
    if not total_tokens:
        raise UpcycleError(f"no domain of {data_dir} has a validation split of at least seq_len + 1 = {seq_len + 1} "
                           "tokens; lower --seq-len or prepare with a larger val_fraction")
    return {"model": str(path), "data": str(data_dir), "seq_len": seq_len, "max_sequences": max_sequences,
            "num_experts": model.config.num_experts, "domains": results,
            "overall": domain_result(total_sum, total_tokens, total_sequences)}


@torch.no_grad()
def score_domains(model: torch.nn.Module, batches: dict[str, list[Tensor]], *, device: torch.device | None = None,
                  autocast=contextlib.nullcontext, per_token: bool = False) -> dict[str, dict]:
    """`domain_result` of every domain's batches (rows of seq_len + 1 tokens) under `model`, which must be in eval
    mode; the trainer's validation, `upcycle eval` and `upcycle experiment` all score through this.

    With `per_token`, each domain's result also holds "token_losses": the next-token cross-entropy of every scored
    token (float64 numpy, row by row in batch order), and its loss is their sum over their count (for per-document
    sums, e.g. a bootstrap over documents)."""
    results = {}
    for name, domain_batches in batches.items():
        loss_sum, num_tokens, num_sequences, token_losses = 0.0, 0, 0, []
        for batch_BT in domain_batches:
            batch_BT = batch_BT if device is None else batch_BT.to(device)
            with autocast():
                output = model(batch_BT[:, :-1])
            if per_token:
                # (B, T, V) -> (B*T,): fp32 log-softmax, as summed_next_token_loss
                losses_N = F.cross_entropy(output.logits.reshape(-1, output.logits.shape[-1]).float(),
                                           batch_BT[:, 1:].reshape(-1), reduction="none")
                token_losses.append(losses_N.double().cpu().numpy())
                batch_sum, batch_tokens = float(token_losses[-1].sum()), losses_N.numel()
            else:
                batch_sum, batch_tokens = summed_next_token_loss(output.logits, batch_BT[:, 1:])
            loss_sum, num_tokens, num_sequences = loss_sum + batch_sum, num_tokens + batch_tokens, \
                num_sequences + batch_BT.shape[0]
        results[name] = domain_result(loss_sum, num_tokens, num_sequences)
        if per_token:
            results[name]["token_losses"] = np.concatenate(token_losses) if token_losses else np.zeros(0)
    return results


def format_table(result: dict) -> str:
    """The per-domain results as a fixed-width text table (the CLI's default output)."""
    lines = [f"{'domain':<16}{'loss':>10}{'ppl':>12}{'tokens':>10}{'seqs':>7}"]
    rows = [*result["domains"].items(), ("(all tokens)", result["overall"])]
    for name, r in rows:
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] is not None else "-"
        lines.append(f"{name:<16}{loss:>10}{ppl:>12}{r['tokens']:>10}{r['sequences']:>7}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness bridge


def find_tokenizer(model_path: Path, data_dir: str | Path | None = None) -> Path:
    """Where the tokenizer of a checkpoint lives: the model directory (convert copies it there), else the tokenizer a
    prepared data directory was made with (our training checkpoints carry none)."""
    if any((model_path / name).is_file() for name in _TOKENIZER_FILES):
        return model_path
    if data_dir is not None:
        recorded = read_metadata(data_dir).get("tokenizer")
        if recorded and Path(recorded).exists():
            return Path(recorded)
    raise UpcycleError(f"no tokenizer files in {model_path}; pass --tokenizer DIR (a directory with tokenizer.json)")


def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = path.parent if path.is_file() else path
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError):
        json_file = path if path.is_file() else path / "tokenizer.json"
        if not json_file.is_file():
            raise UpcycleError(f"transformers cannot load a tokenizer from {path}; pass a directory with "
                               "tokenizer.json") from None
        return PreTrainedTokenizerFast(tokenizer_file=str(json_file))


def write_shipped_tasks(directory: Path) -> Path:
    """Copy the shipped lm-eval task into `directory` with its data file as an absolute path.

    lm-eval hands `dataset_kwargs.data_files` to `datasets.load_dataset`, which resolves a relative path against the
    current directory, not the YAML's; writing the resolved YAML at run time makes the task work from any cwd.
    """
    for yaml_file in _TASK_DIR.glob("*.yaml"):
        config = yaml.safe_load(yaml_file.read_text())
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: str((_TASK_DIR / name).resolve())
                                                  for split, name in files.items()}
        (directory / yaml_file.name).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return directory


def _transformers_model(model_path: Path, tmp: Path):
    """A transformers CausalLM for any checkpoint we read: HF directories load directly, ours are exported first."""
    from transformers import AutoModelForCausalLM

    model_path = as_hf_directory(model_path, tmp)
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise UpcycleError(f"transformers cannot load {model_path}: {str(exc).splitlines()[0]}") from None


def run_lm_eval(
    model_path: str | Path,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    *,
    tokenizer: str | Path | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 8,
) -> dict:
    """Run lm-evaluation-harness tasks on a checkpoint, offline, through its Python API; returns lm-eval's
    {task: {metric: value}} results.

    The shipped `upcycle_continuations` task is always available; `include_path` adds a directory of your own task
    YAMLs. Hub and dataset downloads are switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), so only local tasks work.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UpcycleError(f"lm-eval cannot be imported ({exc}); install the extra: pip install 'upcycle[eval]'") \
            from None
    path = check_model_dir(model_path)
    if not tasks:
        raise UpcycleError("name at least one lm-eval task, e.g. --lm-eval-tasks " + SHIPPED_TASK)
    if include_path is not None and not Path(include_path).is_dir():
        raise UpcycleError(f"--lm-eval-include {include_path} is not a directory of task YAML files")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    tok = _hf_tokenizer(Path(tokenizer) if tokenizer else find_tokenizer(path, data_dir))
    with tempfile.TemporaryDirectory(prefix="upcycle-lm-eval-") as tmp_name:
        tmp = Path(tmp_name)
        shipped = write_shipped_tasks(Path(tempfile.mkdtemp(dir=tmp)))
        model = _transformers_model(path, tmp)
        if len(tok) > model.config.vocab_size:
            raise UpcycleError(f"the tokenizer has {len(tok)} tokens but the model only {model.config.vocab_size}; "
                               "pass the model's own tokenizer with --tokenizer")
        manager = TaskManager(include_path=[str(shipped)] + ([str(include_path)] if include_path else []))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise UpcycleError(f"unknown lm-eval task(s) {unknown}; offline, only local tasks work: {SHIPPED_TASK} or "
                               "YAMLs under --lm-eval-include")
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    return {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in out["results"].items()}
