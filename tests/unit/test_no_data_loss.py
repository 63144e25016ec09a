"""`--force` replaces an output directory; it must never be allowed to replace (and so delete) the command's input."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from helpers import assert_one_line_error, run_cli, save_dense


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(capsys, *argv: str) -> str:
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err)
    return err


@pytest.fixture
def dense(tmp_path) -> Path:
    return save_dense(tmp_path / "parent" / "dense", "llama")


def test_convert_onto_its_own_source_is_refused(capsys, dense):
    before = _tree_digest(dense.parent)
    err = _refused(capsys, "convert", str(dense), str(dense), "--force", "--quiet")
    assert "is the input" in err and "choose another OUTPUT" in err
    assert _tree_digest(dense.parent) == before


def test_convert_onto_a_directory_holding_its_source_is_refused(capsys, dense):
    before = _tree_digest(dense.parent)
    err = _refused(capsys, "convert", str(dense), str(dense.parent), "--force", "--quiet")
    assert "contains the input" in err
    assert _tree_digest(dense.parent) == before


def test_convert_onto_a_symlink_of_its_source_is_refused(capsys, dense, tmp_path):
    alias = tmp_path / "alias"
    alias.symlink_to(dense, target_is_directory=True)
    before = _tree_digest(dense)
    _refused(capsys, "convert", str(dense), str(alias), "--force", "--quiet")
    assert _tree_digest(dense) == before


def test_convert_onto_a_btx_source_is_refused(capsys, dense, tmp_path):
    branch = save_dense(tmp_path / "branch", "llama", seed=1)
    before = _tree_digest(branch)
    _refused(capsys, "convert", str(dense), str(branch), "--method", "btx", "--btx-sources", str(branch),
             "--num-experts", "2", "--force", "--quiet")
    assert _tree_digest(branch) == before


def test_data_prepare_into_the_directory_of_its_inputs_is_refused(capsys, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(repo / "data/sample/code.val.jsonl.gz", corpus / "code.jsonl.gz")
    before = _tree_digest(corpus)
    err = _refused(capsys, "data", "prepare", str(corpus), str(repo / "assets/tokenizer"),
                   "--domain", f"code={corpus / 'code.jsonl.gz'}", "--force")
    assert "contains the input" in err and "choose another OUT" in err
    assert _tree_digest(corpus) == before


def test_convert_force_keeps_a_calibration_file_inside_output(capsys, dense, tmp_path):
    from helpers import write_tokenizer

    write_tokenizer(dense, eos=True)
    out = tmp_path / "out"
    out.mkdir()
    calibration = out / "calibration.jsonl"
    calibration.write_text('{"text": "w1 w2 w3 w4 w5 w6"}\n{"text": "w7 w8 w9 w1 w2"}\n')
    err = _refused(capsys, "convert", str(dense), str(out), "--force", "--router-init", "data", "--calibration",
                   str(calibration), "--num-experts", "2", "--top-k", "1", "--quiet")
    assert "contains the input" in err and "calibration.jsonl" in err
    assert calibration.is_file()


def test_convert_force_keeps_the_blobs_a_cache_snapshot_links_to(capsys, dense, tmp_path):
    """The Hugging Face cache layout: a snapshot directory whose files are symlinks into blobs/."""
    cache = tmp_path / "models--tiny"
    (cache / "blobs").mkdir(parents=True)
    snapshot = cache / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for file in dense.iterdir():
        blob = cache / "blobs" / hashlib.sha256(file.name.encode()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    before = _tree_digest(cache / "blobs")
    err = _refused(capsys, "convert", str(snapshot), str(cache / "blobs"), "--force", "--quiet")
    assert "reads through a symlink" in err
    assert _tree_digest(cache / "blobs") == before
