"""`upcycle check`: how far an upcycled MoE's function is from its dense parent, measured through transformers.

Both models are loaded with `AutoModelForCausalLM` in float32 (no remote code), run on the same probe text, and
compared: max |logit difference|, next-token agreement, and the perplexity of each. A naive conversion must reproduce
the dense function (max |diff| <= tolerance, exit status 1 otherwise); for drop the numbers say how far the initial
function moved, which is what a user needs to choose r and the index mode.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle.convert.compose import Prompts, top1_shares
from upcycle.convert.conversion import check_dense_source
from upcycle.errors import UpcycleError
from upcycle.files import read_json
from upcycle.model.hf import as_hf_directory, is_our_checkpoint, load_transformers, model_tensors
from upcycle.formats.safetensors_io import CheckpointReader

PROBE_TEXT = """\
The dense model is copied into every expert, and a router decides which experts see each token. In the first steps
the upcycled model behaves like its parent; re-drawing part of each expert lets the experts diverge and specialize.

def moving_average(values, window):
    total = sum(values[:window])
    out = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        out.append(total / window)
    return out

専門家の混合モデルは、トークンごとに一部の専門家だけを計算するため、同じ計算量でより大きなモデルを訓練できます。
"""


@dataclass
class CheckReport:
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float
    dense_perplexity: float
    moe_perplexity: float
    num_tokens: int
    method: str | None  # convert's --method, or the command (grow, compose) that wrote the MoE
    renormalize: bool | None  # the conversion's top-k renormalization (manifest), None without a manifest
    equivalent: bool | None  # set when the output should preserve the function (naive convert, grow/compose at r = 0)
    # compose with prompts: per MoE layer {"layer", "top1_share": [share of expert i's positive-prompt tokens whose
    # top-1 expert is one of its own, for each i]}, measured through transformers
    prompt_routing: list[dict] | None = None


@contextlib.contextmanager
def _naming(what: str, path: Path):
    """Say which of the two checkpoints a validation error is about, when its message does not."""
    try:
        yield
    except UpcycleError as exc:
        raise UpcycleError(str(exc) if str(path) in str(exc) else f"{what} {path}: {exc}") from None


def _non_finite_cause(path: Path) -> str:
    """Which tensor of a checkpoint holds NaN or Inf (read one at a time), or that all are finite."""
    reader = CheckpointReader(path)
    for name in reader.tensors:
        if not torch.isfinite(reader.get(name)).all():
            return f"its tensor {name} holds NaN or Inf values"
    return "every tensor is finite: the forward pass overflows"


def _token_ids(text: str, dirs: list[Path], vocab_size: int, max_tokens: int) -> torch.Tensor:
    """Tokenize with the checkpoint's tokenizer; without one, fall back to bytes folded into the vocabulary."""
    for d in dirs:
        if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(str(d))(text)["input_ids"]
            break
    else:
        ids = [b % vocab_size for b in text.encode("utf-8")]
    if len(ids) < 2:
        raise UpcycleError("the probe text gives fewer than 2 tokens; pass a longer --text file")
    return torch.tensor(ids[:max_tokens]).unsqueeze(0)


def _perplexity(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits_BTV[0, :-1].float(), ids_BT[0, 1:])
    return math.exp(loss.item())


def check(moe_dir: str, dense_dir: str, *, text: str | None = None, max_tokens: int = 512,
          tolerance: float = 1e-4) -> CheckReport:
    """Compare the MoE at `moe_dir` with the dense model at `dense_dir` on a probe text."""
    moe_path, dense_path = Path(moe_dir), Path(dense_dir)
    # the validation every other command does before work: config.json, safetensors headers against file sizes (a
    # truncated file is named), pickle weights refused rather than handed to transformers; the dense parent as convert
    # checks its source (supported family, config types, every tensor with its shape). The MoE may be any HF MoE
    # (what transformers cannot build from it is named by load_transformers) or a training checkpoint of ours (exported first).
    with _naming("MoE", moe_path):
        model_tensors(moe_path) if is_our_checkpoint(moe_path) else CheckpointReader(moe_path)
    manifest_path = moe_path / "upcycle_manifest.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    options = manifest.get("options", {})
    method = options.get("method", options.get("command"))
    with _naming("--dense", dense_path):  # grow's parent is the MoE it grew
        CheckpointReader(dense_path) if method == "grow" else check_dense_source(CheckpointReader(dense_path))
    # Only with renormalized top-k weights is a naive conversion the dense function; without (--no-renormalize) each
    # token's FFN output is scaled by the sum of its top-k probabilities, so no tolerance applies. grow and compose
    # record whether their output should compute the parent's function (r = 0, copies of one model).
    exact_by_design = manifest.get("function_preserving", method == "naive" and options.get("renormalize", True))
    with tempfile.TemporaryDirectory() as tmp:  # a training checkpoint of ours is exported there to be loaded
        dense, moe = load_transformers(dense_path), load_transformers(moe_hf := as_hf_directory(moe_path, tmp))
        routing = _prompt_routing(moe, moe_hf, manifest) if "prompts" in manifest else None
    if dense.config.vocab_size != moe.config.vocab_size:
        raise UpcycleError(f"vocabularies differ ({dense.config.vocab_size} vs {moe.config.vocab_size}); "
                           "is --dense the parent of this MoE?")
    ids = _token_ids(text if text is not None else PROBE_TEXT, [dense_path, moe_path], dense.config.vocab_size,
                     max_tokens)
    with torch.no_grad():
        dense_logits = dense(ids).logits.float()
        moe_logits = moe(ids).logits.float()
    for what, path, logits_BTV in (("dense", dense_path, dense_logits), ("MoE", moe_path, moe_logits)):
        if not torch.isfinite(logits_BTV).all():  # nan compares false with any tolerance: no verdict can be given
            raise UpcycleError(f"the {what} model {path} gives NaN or Inf logits on the probe text "
                               f"({_non_finite_cause(path)}); it computes no usable function, re-convert or re-save it")
    diff = (dense_logits - moe_logits).abs()
    max_diff = diff.max().item()
    return CheckReport(
        max_abs_logit_diff=max_diff,
        mean_abs_logit_diff=diff.mean().item(),
        top1_agreement=(dense_logits.argmax(-1) == moe_logits.argmax(-1)).float().mean().item(),
        dense_perplexity=_perplexity(dense_logits, ids),
        moe_perplexity=_perplexity(moe_logits, ids),
        num_tokens=ids.shape[1],
        method=method,
        renormalize=options.get("renormalize", True) if options else None,
        equivalent=(max_diff <= tolerance) if exact_by_design else None,
        prompt_routing=routing,
    )


def _prompt_routing(moe, moe_path: Path, manifest: dict) -> list[dict]:
    """What `upcycle compose` recorded as prompt_routing, measured again through transformers' own model."""
    prompts = Prompts.tokenize(manifest["prompts"], moe_path, f"{moe_path}/upcycle_manifest.json")
    per_layer: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for ids in prompts.sequences:
            router_logits = moe(ids.unsqueeze(0), output_router_logits=True).router_logits  # one per MoE layer
            per_layer = per_layer or [[] for _ in router_logits]
            for layer, logits in enumerate(router_logits):
                per_layer[layer].append(logits.reshape(ids.numel(), -1))
    routed = manifest["options"]["num_experts"] // len(prompts.texts)
    layers = [record["layer"] for record in manifest["layers"]]
    return [{"layer": layer, "top1_share": top1_shares(logits, prompts.owner, len(prompts.texts), routed)}
            for layer, logits in zip(layers, per_layer)]
