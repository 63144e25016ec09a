"""`upcycle bench`: the inference price of an upcycled MoE against its dense parent, in transformers."""

from __future__ import annotations

import json

import pytest

from helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # loads models in several processes: a minute


@pytest.fixture(scope="module")
def pair(llama_dir, tmp_path_factory):
    moe = tmp_path_factory.mktemp("bench") / "moe"
    from upcycle.cli import main

    main(["convert", str(llama_dir), str(moe), "--method", "drop", "--num-experts", "4", "--top-k", "2"])
    return moe, llama_dir


def test_bench_prints_prefill_and_decode_ratios_from_repeats_and_writes_json(pair, tmp_path, capsys):
    moe, dense = pair
    out = tmp_path / "bench.json"
    code, _ = run_cli(capsys, "bench", str(moe), "--dense", str(dense), "--prompt-lengths", "8", "16",
                      "--batch-sizes", "1", "2", "--decode-tokens", "2", "--repeats", "3", "--warmup", "0",
                      "--output", str(out))
    assert code == 0
    record = json.loads(out.read_text())
    assert record["settings"]["repeats"] == 3 and record["device"] == "cpu" and "flags" in record["cpu"]
    assert set(record["ratios"]) == {"prefill_8", "prefill_16", "decode_batch_1", "decode_batch_2"}
    assert all(r > 0 for r in record["ratios"].values())
    models = record["models"]
    assert models["moe"]["params"] > models["dense"]["params"]  # 4 experts hold 4x the FFN weights
    assert models["dense"]["active_params"] == models["dense"]["params"]
    assert models["dense"]["active_params"] < models["moe"]["active_params"] < models["moe"]["params"]
    assert models["moe"]["kv_cache_bytes"] == models["dense"]["kv_cache_bytes"]  # the same attention
    assert all(m["peak_memory_bytes"] > m["weight_bytes"] for m in models.values())


def test_bench_of_a_directory_that_is_not_a_model_is_one_line(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not a model")
    code, err = run_cli(capsys, "bench", str(tmp_path / "notes"), "--quick")
    assert_one_line_error(code, err, "notes")
    code, err = run_cli(capsys, "bench", str(tmp_path / "missing"), "--quick")
    assert_one_line_error(code, err, "does not exist")
    code, err = run_cli(capsys, "bench", str(tmp_path / "notes"), "--repeats", "0")
    assert_one_line_error(code, err, "--repeats must be >= 1")


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_decode_passes_the_kv_cache_back_under_the_name_the_model_gives_it(name):
    """transformers 5.24 names the KV cache `cache`, 5.17 (the GPU machines' version) `past_key_values`: decoding
    feeds back what the model returned, under the name it returned it."""
    import torch

    from upcycle.eval.bench import _decode

    class Output(dict):  # a model output as either version builds it: a mapping with a logits attribute
        logits = torch.zeros(1, 1, 4)

    calls = []

    def model(ids, use_cache, **kwargs):
        calls.append(kwargs)
        return Output({"logits": Output.logits, name: len(calls)})

    _decode(model, torch.zeros(1, 3, dtype=torch.long), steps=2, device=torch.device("cpu"))
    assert calls == [{}, {name: 1}, {name: 2}]
