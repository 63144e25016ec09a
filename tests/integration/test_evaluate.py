"""Tests for upcycle.eval.evaluate: per-domain loss/perplexity against a hand computation, the CLI, input errors, and
the lm-evaluation-harness bridge on the shipped local task (skipped when lm-eval is not installed).

The tiny data directory and MoE (`make_prepared`, `tiny_moe`) come from tests/helpers.py, shared with test_analyze.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import EVAL_VOCAB as VOCAB
from helpers import make_prepared, tiny_moe
from upcycle.commands import eval_command
from upcycle.data.prepare import validation_batches
from upcycle.errors import UpcycleError
from upcycle.eval.evaluate import SHIPPED_TASK, evaluate, perplexity, summed_next_token_loss
from upcycle.model.hf import export_hf, save_model
from upcycle.model.transformer import Transformer

SEQ_LEN = 32

@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    return make_prepared(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    return save_model(tiny_moe(), tmp_path_factory.mktemp("ckpt") / "moe")


def _hand_losses(model: Transformer, data: Path, **kwargs) -> dict[str, tuple[float, int]]:
    """Per domain: mean of -log softmax(logits)[target] over every scored token, computed without F.cross_entropy."""
    out = {}
    with torch.no_grad():
        for domain, batches in validation_batches(data, **kwargs).items():
            nll, count = [], 0
            for batch in batches:
                logp = torch.log_softmax(model(batch[:, :-1]).logits.double(), dim=-1)
                nll.append(-logp.gather(-1, batch[:, 1:, None]).sum())
                count += batch[:, 1:].numel()
            out[domain] = (float(sum(nll)) / count, count)
    return out


def test_loss_matches_hand_computation(prepared, moe_dir):
    data, _ = prepared
    # batch_size 3 leaves a short last batch: a mean of batch means would differ from the token-weighted mean
    result = evaluate(moe_dir, data, seq_len=SEQ_LEN, batch_size=3, max_sequences=7)
    from upcycle.model.hf import load_model

    hand = _hand_losses(load_model(moe_dir), data, seq_len=SEQ_LEN, batch_size=3, max_sequences=7)
    assert set(result["domains"]) == {"code", "english", "japanese"}
    for domain, (loss, count) in hand.items():
        r = result["domains"][domain]
        assert r["tokens"] == count == r["sequences"] * SEQ_LEN
        assert r["loss"] == pytest.approx(loss, rel=1e-5)
        assert r["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    total = sum(loss * count for loss, count in hand.values()) / sum(count for _, count in hand.values())
    assert result["overall"]["loss"] == pytest.approx(total, rel=1e-5)
    # a random model is far from perfect but better than nothing: close to log V nats
    assert 0.5 * math.log(VOCAB) < result["overall"]["loss"] < 2 * math.log(VOCAB)


def test_hf_export_scores_the_same(prepared, moe_dir, tmp_path):
    """The same weights as an HF Mixtral checkpoint give the same losses (load_model reads both kinds)."""
    data, _ = prepared
    from upcycle.model.hf import load_model

    model = load_model(moe_dir)
    hf_dir = export_hf(model, model.config, tmp_path / "hf")
    ours = evaluate(moe_dir, data, seq_len=SEQ_LEN, max_sequences=4, domains=["code"])
    theirs = evaluate(hf_dir, data, seq_len=SEQ_LEN, max_sequences=4, domains=["code"])
    assert list(theirs["domains"]) == ["code"]
    assert theirs["domains"]["code"]["loss"] == pytest.approx(ours["domains"]["code"]["loss"], rel=1e-6)


def test_summed_loss_and_perplexity():
    logits = torch.zeros(2, 3, 5)
    labels = torch.tensor([[0, 1, 2], [3, 4, 0]])
    total, count = summed_next_token_loss(logits, labels)
    assert count == 6 and total == pytest.approx(6 * math.log(5))
    assert perplexity(math.log(5)) == pytest.approx(5.0)
    assert perplexity(1e4) == math.inf
    assert F.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1)).item() == pytest.approx(total / count)


def test_cli_table_and_json(prepared, moe_dir, capsys):
    data, _ = prepared
    eval_command(str(moe_dir), data=str(data), seq_len=SEQ_LEN, max_sequences=2, json_output=True)
    result = json.loads(capsys.readouterr().out)
    assert result["overall"]["tokens"] == 3 * 2 * SEQ_LEN
    eval_command(str(moe_dir), data=str(data), seq_len=SEQ_LEN, max_sequences=2)
    table = capsys.readouterr().out
    assert "japanese" in table and f"{result['domains']['japanese']['loss']:.4f}" in table


def test_input_errors(prepared, moe_dir, tmp_path):
    data, _ = prepared
    with pytest.raises(UpcycleError, match="does not exist"):
        evaluate(tmp_path / "missing", data)
    with pytest.raises(UpcycleError, match="no data.json"):
        evaluate(moe_dir, tmp_path)
    small = save_model(tiny_moe(vocab_size=64), tmp_path / "small_vocab")
    with pytest.raises(UpcycleError, match="model's tokenizer"):
        evaluate(small, data, seq_len=SEQ_LEN)
    with pytest.raises(UpcycleError, match="max_seq_len"):
        evaluate(moe_dir, data, seq_len=1024)


@pytest.mark.slow
def test_lm_eval_bridge_runs_shipped_task(prepared, moe_dir):
    """End to end through lm-eval's Python API on the shipped 20-item task, and its accuracy equals our own scoring
    of the same (context, continuation) token splits."""
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from upcycle.eval.evaluate import _TASK_DIR, run_lm_eval
    from upcycle.model.hf import load_model

    data, tokenizer_dir = prepared
    results = run_lm_eval(moe_dir, [SHIPPED_TASK], data_dir=data)  # tokenizer found through data.json
    acc = results[SHIPPED_TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = load_model(moe_dir)
    items = [json.loads(line) for line in (_TASK_DIR / f"{SHIPPED_TASK}.jsonl").read_text().splitlines()]
    assert len(items) == 20
    correct = 0
    with torch.no_grad():
        for item in items:
            scores = []
            for choice in item["choices"]:
                # lm-eval's split: encode context + continuation whole, the continuation is what follows the context
                whole = tok(item["context"] + choice, add_special_tokens=False)["input_ids"]
                n_ctx = len(tok(item["context"], add_special_tokens=False)["input_ids"])
                ids = torch.tensor([whole])
                logp = torch.log_softmax(model(ids[:, :-1]).logits.double(), dim=-1)[0]
                scores.append(float(sum(logp[t - 1, whole[t]] for t in range(n_ctx, len(whole)))))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
    assert acc == pytest.approx(correct / len(items))
