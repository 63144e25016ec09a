"""scripts/corpus_pack.py: the prepared corpus packed to travel to a GPU machine, and unpacked there bit for bit."""

import gzip
import importlib.util
import json
import lzma

import pytest
from helpers import REPO, make_data_dir, make_tokenizer

from upcycle.errors import UpcycleError


@pytest.fixture(scope="module")
def corpus_pack():
    spec = importlib.util.spec_from_file_location("corpus_pack", REPO / "scripts" / "corpus_pack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_then_unpack_gives_the_prepared_directory_back_byte_for_byte(corpus_pack, tmp_path):
    prepared = make_data_dir(tmp_path / "prepared")
    record = corpus_pack.pack(prepared, tmp_path / "packed")
    names = sorted(p.name for p in prepared.iterdir())
    assert sorted(record["files"]) == names
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == sorted([f"{n}.xz" for n in names] +
                                                                             ["packed.json"])
    for name, info in record["files"].items():  # real xz files, smaller than what they hold
        assert info["packed_bytes"] == (tmp_path / "packed" / f"{name}.xz").stat().st_size < info["bytes"]
        assert lzma.decompress((tmp_path / "packed" / f"{name}.xz").read_bytes()) == (prepared / name).read_bytes()
    corpus_pack.unpack(tmp_path / "packed", tmp_path / "back")
    for name in names:
        assert (tmp_path / "back" / name).read_bytes() == (prepared / name).read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "swapped", "missing"])
def test_a_damaged_pack_is_refused_and_nothing_is_written(corpus_pack, tmp_path, damage):
    prepared = make_data_dir(tmp_path / "prepared")
    packed = tmp_path / "packed"
    corpus_pack.pack(prepared, packed)
    target = packed / "code.train.bin.xz"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:-40])
    elif damage == "swapped":  # a valid xz file of the wrong content: only the checksum can tell
        target.write_bytes((packed / "english.train.bin.xz").read_bytes())
    else:
        target.unlink()
    with pytest.raises(UpcycleError, match="code.train.bin.xz"):
        corpus_pack.unpack(packed, tmp_path / "back")
    assert not (tmp_path / "back").exists() and not list(tmp_path.glob(".back*"))


def test_ensure_keeps_unpacks_or_prepares_in_that_order(corpus_pack, tmp_path):
    prepared = make_data_dir(tmp_path / "prepared")
    corpus_pack.pack(prepared, tmp_path / "packed")
    missing = tmp_path / "none"
    assert corpus_pack.ensure(prepared, packed=missing, text=missing, tokenizer=missing) == "present"
    target = tmp_path / "arrived"
    assert corpus_pack.ensure(target, packed=tmp_path / "packed", text=missing, tokenizer=missing) == "unpacked"
    assert (target / "data.json").read_bytes() == (prepared / "data.json").read_bytes()
    with pytest.raises(UpcycleError, match="carry the packed corpus"):
        corpus_pack.ensure(tmp_path / "nothing", packed=missing, text=missing, tokenizer=missing)

    text = tmp_path / "text"  # the corpus's text as build_corpus.py writes it: prepared with the tokenizer
    text.mkdir()
    for domain in corpus_pack.DOMAINS:
        for split, count in (("train", 30), ("val", 3)):
            with gzip.open(text / f"{domain}.{split}.jsonl.gz", "wt") as f:
                for i in range(count):
                    f.write(json.dumps({"text": f"{domain} document {i}: " + "some words here " * 20}) + "\n")
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    made = tmp_path / "made"
    assert corpus_pack.ensure(made, packed=missing, text=text, tokenizer=tokenizer) == "prepared"
    metadata = json.loads((made / "data.json").read_text())
    assert sorted(metadata["domains"]) == sorted(corpus_pack.DOMAINS)
    assert all(metadata["domains"][d]["val"]["documents"] == 3 for d in corpus_pack.DOMAINS)


def test_the_command_line_says_what_is_wrong_in_one_line(corpus_pack, tmp_path, capsys):
    assert corpus_pack.main(["pack", str(tmp_path / "nothing"), str(tmp_path / "packed")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no data.json" in err and "upcycle data prepare" in err
    prepared = make_data_dir(tmp_path / "prepared")
    assert corpus_pack.main(["pack", str(prepared), str(tmp_path / "packed")]) == 0
    assert corpus_pack.main(["pack", str(prepared), str(tmp_path / "packed")]) == 2
    assert "--force" in capsys.readouterr().err


def test_the_checkout_and_the_packed_corpus_fit_one_device_run():
    """A GPU piece's run carries the checkout (tracked files and untracked ones git does not ignore) and the packed
    corpus, 64 MiB in all; the packed corpus's measured size is the one pieces.md states. A commit that grows the
    repository past what is left fails here, not on the GPU machine."""
    import re
    import subprocess

    ledger = (REPO / "docs" / "experiments" / "replication" / "pieces.md").read_text()
    packed = int(re.search(r"packed corpus is ([\d,]+) bytes", ledger).group(1).replace(",", ""))
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    paths = [REPO / name.decode() for name in listed if name]
    checkout = sum(path.stat().st_size for path in paths if path.is_file())
    assert checkout + packed <= 64 * 2**20 - 4 * 2**20, (checkout, packed)  # 4 MiB kept for what a session adds
