"""Model cards: every directory convert, compose, grow and export write holds a README.md the Hub parses, naming the
method, the sources' sha256 and the command; `upcycle check` adds its result to cards we wrote and to no other."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from helpers import make_data_dir, run_cli, save_dense, tiny_config, write_config, write_tokenizer
from upcycle.formats.model_card import CARD_MARKER, front_matter


def _hub_card(directory):
    """The card as the Hub reads it: huggingface_hub's parser, with its YAML front matter."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(directory / "README.md")
    return card.data.to_dict(), card.text


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    directory = save_dense(tmp_path_factory.mktemp("dense") / "llama", "llama")
    write_tokenizer(directory)
    (directory / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: someorg/some-llama\n---\n# Llama\n")
    return directory


def test_convert_writes_a_card_with_the_method_sources_and_command(dense, tmp_path, capsys):
    out = tmp_path / "moe"
    code, _ = run_cli(capsys, "convert", str(dense), str(out), "--method", "drop", "--num-experts", "4", "--top-k", "2")
    assert code in (0, None)
    data, text = _hub_card(out)
    # the source's own card: its license and base model carry over; our card replaces none of its files
    assert data["license"] == "apache-2.0" and data["base_model"] == "someorg/some-llama"
    assert data["library_name"] == "transformers" and {"moe", "drop", "mixtral"} <= set(data["tags"])
    manifest = json.loads((out / "upcycle_manifest.json").read_text())
    for digest in manifest["sources"][0]["sha256"].values():
        assert digest in text
    assert f"Command: `upcycle convert {dense} {out} --method drop --num-experts 4 --top-k 2`" in text
    assert "| routed experts per MoE layer | 4 |" in text and "| experts per token (top-k) | 2 |" in text
    assert (dense / "README.md").read_text().startswith("---\nlicense: apache-2.0")  # the source's card untouched


def test_check_adds_its_result_once_and_leaves_other_cards_alone(dense, tmp_path, capsys):
    out = tmp_path / "naive"
    run_cli(capsys, "convert", str(dense), str(out), "--method", "naive", "--num-experts", "4")
    for _ in range(2):  # a second check replaces the first's section
        code, err = run_cli(capsys, "check", str(out), "--dense", str(dense))
        assert code == 0 and "added the result" in err
    text = (out / "README.md").read_text()
    assert text.count("## Function check") == 1 and "EQUIVALENT at tolerance" in text
    assert front_matter(out / "README.md")["library_name"] == "transformers"  # still a valid card
    foreign = tmp_path / "foreign"
    shutil.copytree(out, foreign)
    (foreign / "README.md").write_text("# someone else's card\n")
    code, err = run_cli(capsys, "check", str(foreign), "--dense", str(dense))
    assert code == 0 and "added the result" not in err
    assert (foreign / "README.md").read_text() == "# someone else's card\n"


def test_grow_compose_and_export_write_cards_too(dense, tmp_path, capsys):
    moe = tmp_path / "moe"
    run_cli(capsys, "convert", str(dense), str(moe), "--method", "naive", "--num-experts", "2", "--top-k", "1")
    grown = tmp_path / "grown"
    code, _ = run_cli(capsys, "grow", str(moe), str(grown), "--factor", "2")
    assert code in (0, None)
    data, text = _hub_card(grown)
    assert "grow" in data["tags"] and "`upcycle grow`" in text and "| routed experts per MoE layer | 4 |" in text
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"base": str(dense), "router": "uniform",
                                    "experts": [{"source": str(dense)}, {"source": str(dense)}]}))
    composed = tmp_path / "composed"
    code, _ = run_cli(capsys, "compose", str(spec), str(composed))
    assert code in (0, None)
    data, text = _hub_card(composed)
    assert "compose" in data["tags"] and f"`upcycle compose {spec} {composed}`" in text
    # export of a training checkpoint: what it was trained from and for how long
    config = write_config(tmp_path / "c.yaml", tiny_config(make_data_dir(tmp_path / "data"),
                                                           train={"max_steps": 2, "eval_every": 0}))
    code, _ = run_cli(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert code in (0, None)
    exported = tmp_path / "exported"
    code, _ = run_cli(capsys, "export", str(tmp_path / "run" / "checkpoints" / "step_00000002"), str(exported))
    assert code in (0, None)
    data, text = _hub_card(exported)
    assert "step 2, 512 tokens" in text and CARD_MARKER in text and data["library_name"] == "transformers"
