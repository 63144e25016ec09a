"""--router-init data: router rows from streaming k-means of the hidden states entering each FFN on calibration text.
At step 0 the routing of the converted model already separates domains that differ, more than the uniform router."""

from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import assert_convert_refused, save_dense, write_tokenizer
from upcycle.convert.calibration import kmeans_plus_plus, rows_from_centroids, update_centroids
from upcycle.convert.check import check
from upcycle.convert.conversion import MANIFEST_NAME, convert


def _documents(words: range, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.choice(words)}" for _ in range(rng.randint(20, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny tokenized dense model and two domains with disjoint words (w0-w29 and w30-w59)."""
    root = tmp_path_factory.mktemp("router_init_data")
    dense = save_dense(root / "dense", "llama")
    write_tokenizer(dense, eos=True)
    domains = {"alpha": _documents(range(0, 30), 60, 1), "beta": _documents(range(30, 60), 60, 2)}
    for name, docs in domains.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    mixed = [d for pair in zip(domains["alpha"], domains["beta"]) for d in pair]
    (root / "calibration.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in mixed))
    from upcycle.data.prepare import prepare

    data = root / "data"
    prepare({name: [root / f"{name}.jsonl"] for name in domains}, data, dense, val_fraction=0.5, progress=False)
    return root, dense, data


def test_streaming_kmeans_finds_separated_clusters_and_rows_get_the_uniform_norm():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]], dtype=torch.float64)
    points = torch.cat([c + 0.1 * torch.randn(200, 2, generator=gen, dtype=torch.float64) for c in centres])
    points = points[torch.randperm(600, generator=gen)]
    centroids = kmeans_plus_plus(points[:100], 3, torch.Generator().manual_seed(1))
    counts = torch.zeros(3, dtype=torch.float64)
    for batch in points.split(100):
        update_centroids(centroids, counts, batch)
    found = sorted(map(tuple, centroids.round().tolist()))
    assert found == sorted(map(tuple, centres.tolist())) and counts.tolist() == [200.0, 200.0, 200.0]
    centroids = torch.randn(4, 64, generator=gen)
    rows = rows_from_centroids(centroids, std=0.02)
    torch.testing.assert_close(rows.norm(dim=1), torch.full((4,), 0.02 * 8.0))  # a uniform-init row's norm
    centred = centroids - centroids.mean(dim=0)
    torch.testing.assert_close(torch.cosine_similarity(rows, centred, dim=1), torch.ones(4))


def test_data_router_specializes_domains_at_step_0_and_keeps_the_dense_function(tmp_path, corpus):
    from upcycle.eval.analyze import analyze

    root, dense, data = corpus
    common = dict(progress=False, method="naive", num_experts=8, top_k=4, granularity=2)
    uniform = convert(dense, tmp_path / "uniform", **common)
    by_data = convert(dense, tmp_path / "data", router_init="data", calibration=str(root / "calibration.jsonl"),
                      calibration_tokens=3000, **common)
    assert check(str(by_data), str(dense)).max_abs_logit_diff <= 1e-4  # whole copies still picked
    manifest = json.loads((by_data / MANIFEST_NAME).read_text())
    assert manifest["calibration_tokens_used"] == 3000
    assert all(sum(layer["router_cluster_sizes"]) == 3000 for layer in manifest["layers"])
    jsd = {}
    for name, model in (("uniform", uniform), ("data", by_data)):
        result = analyze(model, data, tmp_path / f"analysis-{name}", seq_len=32, max_sequences=16, plots=False)
        jsd[name] = [layer["specialization_jsd"] for layer in result["layers"]]
    assert all(d > u for d, u in zip(jsd["data"], jsd["uniform"])), jsd
    # the same inputs give the same router
    again = convert(dense, tmp_path / "again", router_init="data", calibration=str(root / "calibration.jsonl"),
                    calibration_tokens=3000, **common)
    assert (again / "model.safetensors").read_bytes() == (by_data / "model.safetensors").read_bytes()


@pytest.mark.parametrize("setup, args, message", [
    ("empty", ["--router-init", "data", "--calibration", "{root}/empty.jsonl"], "has no text; pass a JSONL file"),
    ("blank", ["--router-init", "data", "--calibration", "{root}/blank.txt"], "has no text"),
    (None, ["--router-init", "data"], "--router-init data needs --calibration FILE"),
    (None, ["--calibration", "{root}/x.txt"], "--calibration is only used with --router-init data"),
    (None, ["--router-init", "data", "--calibration", "{root}/missing.txt"], "does not exist"),
])
def test_bad_calibration_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, corpus, setup, args, message):
    root, dense, _ = corpus
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    (tmp_path / "blank.txt").write_text("")
    (tmp_path / "x.txt").write_text("w1 w2")
    args = [a.format(root=tmp_path) for a in args]
    assert_convert_refused(capsys, dense, tmp_path / "out", *args, message=message)
