"""Tests for upcycle.data.prepare: prepare (text -> token files) and the mixture / validation loaders.

Everything runs on small real text (sentences below, the standard library's own sources, and the committed sample in
data/sample) with a byte-level BPE trained in a fixture, so no download is needed.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from upcycle.data.prepare import (
    MixtureLoader,
    choose_dtype,
    choose_validation,
    load_tokenizer,
    prepare,
    read_metadata,
    read_tokens,
    validation_batches,
)
from upcycle.errors import UpcycleError

REPO = Path(__file__).resolve().parents[2]
EOS = "<|endoftext|>"

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A mixture of experts routes every token to a few of its feed-forward networks.",
    "Upcycling starts sparse training from the weights of a dense model.",
    "Each expert begins as a copy of the dense feed-forward block.",
    "Half of the intermediate neurons are re-initialized to break the symmetry.",
    "The router is a linear layer followed by a softmax over the experts.",
    "Validation loss is measured separately for every domain.",
    "Tokens are packed into fixed-length sequences separated by end-of-text markers.",
]
JAPANESE = [
    "吾輩は猫である。名前はまだ無い。",
    "どこで生れたかとんと見当がつかぬ。",
    "専門家の混合モデルは、各トークンを少数の専門家に割り当てる。",
    "東京は日本の首都であり、人口が多い。",
    "このコマンドはファイルを一覧表示します。",
    "設定ファイルを編集してから、サービスを再起動してください。",
]


def _documents(sentences: list[str], count: int, seed: int) -> list[str]:
    """`count` distinct documents of 1-6 sentences each (numbered so no two are equal)."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 6))) for i in range(count)]


def _code_documents(count: int) -> list[str]:
    """Real Python source: the first `count` non-empty modules of the standard library's json and email packages."""
    import email
    import json as json_module

    files = sorted(Path(json_module.__file__).parent.glob("*.py")) + sorted(Path(email.__file__).parent.glob("*.py"))
    texts = [f.read_text(encoding="utf-8") for f in files]
    return [t for t in texts if t][:count]


def _decode_documents(tokenizer, ids: np.ndarray, eos_id: int) -> list[str]:
    """Split a token stream at EOS and decode each document; the stream must end with EOS."""
    ids = ids.astype(np.int64)
    assert len(ids) == 0 or ids[-1] == eos_id
    ends = np.flatnonzero(ids == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(ids[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, ends)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """Three domains on disk in the formats prepare reads: a directory of .txt files, a .jsonl, a .jsonl.gz."""
    root = tmp_path_factory.mktemp("corpus")
    english = _documents(ENGLISH, 120, seed=1)
    japanese = _documents(JAPANESE, 80, seed=2)
    code = _code_documents(12)

    (root / "english").mkdir()
    for i, text in enumerate(english):
        (root / "english" / f"{i:04d}.txt").write_text(text, encoding="utf-8")
    (root / "english" / ".hidden.txt").write_text("must be ignored", encoding="utf-8")
    with open(root / "japanese.jsonl", "w", encoding="utf-8") as handle:
        for text in japanese:
            handle.write(json.dumps({"text": text, "id": 0}, ensure_ascii=False) + "\n")
    with gzip.open(root / "code.jsonl.gz", "wt", encoding="utf-8") as handle:
        for text in code:
            handle.write(json.dumps({"text": text}) + "\n")
    return {
        "root": root,
        "documents": {"english": english, "japanese": japanese, "code": code},
        "sources": {"english": [root / "english"], "japanese": [root / "japanese.jsonl"],
                    "code": [root / "code.jsonl.gz"]},
    }


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    """A 512-id byte-level BPE trained on the fixture corpus, saved the way HF tokenizer directories are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([t for docs in corpus["documents"].values() for t in docs], trainer)
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return directory


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(corpus["sources"], out, tokenizer_dir, val_fraction=0.1, seed=3, progress=False)
    return out


def test_round_trip_and_split(prepared, corpus, tokenizer_dir):
    """Each split decodes to exactly its documents, in input order, each followed by EOS; val is the seeded choice."""
    tokenizer, eos_id = load_tokenizer(tokenizer_dir)
    metadata = read_metadata(prepared)
    assert metadata["eos_id"] == eos_id == tokenizer.token_to_id(EOS)
    for name, documents in corpus["documents"].items():
        is_val = choose_validation(len(documents), 0.1, 3, name)
        assert is_val.sum() == max(1, round(0.1 * len(documents)))
        for split, mask in (("train", ~is_val), ("val", is_val)):
            expected = [d for d, keep in zip(documents, mask) if keep]
            tokens = read_tokens(prepared, name, split)
            assert _decode_documents(tokenizer, tokens, eos_id) == expected
            info = metadata["domains"][name][split]
            assert info["tokens"] == len(tokens) and info["documents"] == len(expected)


def test_hidden_files_are_skipped(prepared, corpus):
    metadata = read_metadata(prepared)
    assert not any(".hidden" in s for s in metadata["domains"]["english"]["sources"])
    assert len(metadata["domains"]["english"]["sources"]) == len(corpus["documents"]["english"])


def test_dtype_choice(prepared, corpus, tokenizer_dir, tmp_path):
    assert read_metadata(prepared)["dtype"] == "uint16"
    assert read_tokens(prepared, "english").dtype == np.uint16
    assert choose_dtype(65536) == np.uint16  # ids 0..65535 all fit
    assert choose_dtype(65537) == np.uint32
    assert choose_dtype(151_936) == np.uint32  # Qwen2's vocabulary
    with pytest.raises(UpcycleError, match="does not fit uint16"):
        choose_dtype(151_936, "uint16")

    out = tmp_path / "wide"
    prepare({"japanese": corpus["sources"]["japanese"]}, out, tokenizer_dir, dtype="uint32", seed=3,
            val_fraction=0.1, progress=False)
    wide = read_tokens(out, "japanese")
    assert wide.dtype == np.uint32
    assert (out / "japanese.train.bin").stat().st_size == 4 * len(wide)
    np.testing.assert_array_equal(wide, read_tokens(prepared, "japanese"))


def test_split_is_deterministic_and_depends_on_seed(prepared, corpus, tokenizer_dir, tmp_path):
    again = tmp_path / "again"
    prepare(corpus["sources"], again, tokenizer_dir, val_fraction=0.1, seed=3, progress=False)
    for name in corpus["documents"]:
        for split in ("train", "val"):
            assert (again / f"{name}.{split}.bin").read_bytes() == (prepared / f"{name}.{split}.bin").read_bytes()

    a = choose_validation(1000, 0.05, seed=0, domain="english")
    b = choose_validation(1000, 0.05, seed=1, domain="english")
    c = choose_validation(1000, 0.05, seed=0, domain="japanese")
    assert a.sum() == b.sum() == c.sum() == 50
    assert (a != b).any() and (a != c).any()
    assert choose_validation(1, 0.5, 0, "x").sum() == 0  # a single document always trains
    assert choose_validation(10, 0.0, 0, "x").sum() == 0


def test_gzip_plain_text_equals_uncompressed(corpus, tokenizer_dir, tmp_path):
    documents = corpus["documents"]["english"][:20]
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir(), packed.mkdir()
    for i, text in enumerate(documents):
        (plain / f"{i:02d}.txt").write_text(text, encoding="utf-8")
        with gzip.open(packed / f"{i:02d}.txt.gz", "wt", encoding="utf-8") as handle:
            handle.write(text)
    prepare({"en": [plain]}, tmp_path / "a", tokenizer_dir, val_fraction=0.1, progress=False)
    prepare({"en": [packed]}, tmp_path / "b", tokenizer_dir, val_fraction=0.1, progress=False)
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_tokens(tmp_path / "a", "en", split),
                                      read_tokens(tmp_path / "b", "en", split))


def _loader(prepared, **kwargs) -> MixtureLoader:
    defaults = dict(seq_len=16, global_batch_size=8, seed=0)
    return MixtureLoader(prepared, **{**defaults, **kwargs})


def _write_prepared(directory: Path, streams: dict[str, np.ndarray]) -> Path:
    """A prepared directory in the documented format, holding given token streams (train split only)."""
    directory.mkdir()
    domains = {}
    for name, tokens in streams.items():
        tokens.astype(np.uint32).tofile(directory / f"{name}.train.bin")
        (directory / f"{name}.val.bin").write_bytes(b"")
        domains[name] = {"train": {"file": f"{name}.train.bin", "tokens": len(tokens), "documents": 1},
                         "val": {"file": f"{name}.val.bin", "tokens": 0, "documents": 0}, "sources": []}
    metadata = {"format": 1, "tokenizer": "none", "vocab_size": 2**20, "eos_id": 0, "dtype": "uint32",
                "domains": domains}
    (directory / "data.json").write_text(json.dumps(metadata))
    return directory


def test_rows_are_chunks_and_an_epoch_covers_every_chunk_once(tmp_path):
    """Token i holds the value i (offset per domain), so a row's first token says which chunk it is."""
    data = _write_prepared(tmp_path / "data", {"a": np.arange(16 * 23 + 5), "b": 10**6 + np.arange(16 * 9 + 1)})
    loader = MixtureLoader(data, seq_len=16, global_batch_size=4, seed=0)
    assert loader.num_chunks == {"a": 23, "b": 9}
    seen = {"a": [], "b": []}
    for _ in range(40):
        batch, domains = loader.next_batch_with_domains()
        assert batch.shape == (4, 17) and batch.dtype == torch.int64
        for row, domain in zip(batch, domains):
            name = loader.domains[domain]
            # A contiguous window of seq_len + 1 tokens at a multiple of seq_len, from the domain it claims.
            assert torch.equal(row - row[0], torch.arange(17))
            start = int(row[0]) - (10**6 if name == "b" else 0)
            assert start % 16 == 0
            seen[name].append(start // 16)
    for name, count in loader.num_chunks.items():
        assert len(seen[name]) >= 2 * count  # the test crossed at least one epoch boundary
        for epoch in range(len(seen[name]) // count):
            order = seen[name][epoch * count:(epoch + 1) * count]
            assert sorted(order) == list(range(count)), (name, epoch)
        assert seen[name][:count] != seen[name][count:2 * count]  # each epoch reshuffles
    assert loader.epochs()["a"] == pytest.approx(len(seen["a"]) / 23)


def test_mixture_proportions(prepared):
    """Row domains follow the weights; the tolerance is 5 binomial standard deviations of the observed share."""
    def shares(loader, steps):
        counts = np.zeros(len(loader.domains))
        for _ in range(steps):
            _, domains = loader.next_batch_with_domains()
            counts += np.bincount(domains.numpy(), minlength=len(loader.domains))
        return counts / counts.sum(), counts.sum()

    loader = _loader(prepared, global_batch_size=32)
    metadata = read_metadata(prepared)
    sizes = np.array([metadata["domains"][name]["train"]["tokens"] for name in loader.domains], dtype=float)
    expected = sizes / sizes.sum()
    observed, n = shares(loader, 150)
    np.testing.assert_allclose(observed, expected, atol=5 * np.sqrt(expected * (1 - expected) / n).max())

    loader = _loader(prepared, global_batch_size=32, weights={"english": 3, "code": 1, "japanese": 0})
    assert loader.domains == ["code", "english"]
    observed, n = shares(loader, 150)
    np.testing.assert_allclose(observed, [0.25, 0.75], atol=5 * np.sqrt(0.25 * 0.75 / n))


def test_same_seed_same_batches_other_seed_different(prepared):
    a, b, c = _loader(prepared, seed=5), _loader(prepared, seed=5), _loader(prepared, seed=6)
    batches_a = [a.next_batch() for _ in range(5)]
    assert all(torch.equal(x, b.next_batch()) for x in batches_a)
    assert not all(torch.equal(x, c.next_batch()) for x in batches_a)


@pytest.mark.parametrize("source", ["prepared", "small"])
def test_resume_from_state_dict_is_exact(source, prepared, tmp_path):
    """Resume mid-run; on the "small" data the run crosses epoch boundaries before and after the save."""
    if source == "small":
        data = _write_prepared(tmp_path / "data", {"a": np.arange(16 * 7 + 1), "b": 1000 + np.arange(16 * 5 + 1)})
    else:
        data = prepared
    reference = _loader(data, seed=1)
    expected = [reference.next_batch() for _ in range(60)]

    first = _loader(data, seed=1)
    for _ in range(25):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    resumed = _loader(data, seed=1)
    resumed.load_state_dict(state)
    for step in range(25, 60):
        assert torch.equal(resumed.next_batch(), expected[step]), step
    if source == "small":
        assert min(first.epochs().values()) > 1 and min(reference.epochs().values()) > 2


def test_ranks_union_equals_single_process(prepared):
    single = _loader(prepared, global_batch_size=8, seed=2)
    ranks = [_loader(prepared, global_batch_size=8, seed=2, rank=r, world_size=4) for r in range(4)]
    for _ in range(10):
        full, full_domains = single.next_batch_with_domains()
        parts = [rank.next_batch_with_domains() for rank in ranks]
        assert all(p[0].shape == (2, 17) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), full)
        assert torch.equal(torch.cat([p[1] for p in parts]), full_domains)

    # A checkpoint written by one process resumes on two ranks (and the other way round).
    two = [_loader(prepared, global_batch_size=8, seed=2, rank=r, world_size=2) for r in range(2)]
    for rank in two:
        rank.load_state_dict(single.state_dict())
    assert torch.equal(torch.cat([rank.next_batch() for rank in two]), single.next_batch())


def test_validation_batches(prepared):
    batches = validation_batches(prepared, seq_len=8, batch_size=3, max_sequences=7)
    again = validation_batches(prepared, seq_len=8, batch_size=3, max_sequences=7)
    assert sorted(batches) == ["code", "english", "japanese"]
    for name, domain_batches in batches.items():
        rows = torch.cat(domain_batches)
        assert rows.shape == (7, 9)
        assert all(len(b) <= 3 for b in domain_batches)
        assert torch.equal(rows, torch.cat(again[name]))
        stream = read_tokens(prepared, name, "val").astype(np.int64)
        chunks = np.lib.stride_tricks.sliding_window_view(stream, 9)[::8]
        assert all(np.all(chunks == row, axis=1).any() for row in rows.numpy())
        assert len({tuple(r) for r in rows.tolist()}) == 7  # distinct chunks, not one repeated
    sharded = [validation_batches(prepared, seq_len=8, batch_size=3, max_sequences=7, rank=r, world_size=2)
               for r in range(2)]
    assert sum(len(s["code"]) for s in sharded) == len(batches["code"])


def test_cli_flags(corpus, tokenizer_dir, tmp_path, capsys):
    """The documented `upcycle data prepare OUT TOKENIZER --domain NAME=PATHS` form, through the real CLI."""
    from upcycle.cli import main

    out = tmp_path / "cli"
    main([
        "data", "prepare", str(out), str(tokenizer_dir),
        "--domain", f"english={corpus['root'] / 'english'}", f"code={corpus['root'] / 'code.jsonl.gz'}",
        "--val-fraction", "0.2", "--seed", "3",
    ])
    metadata = read_metadata(out)
    assert sorted(metadata["domains"]) == ["code", "english"]
    assert metadata["domains"]["english"]["val"]["documents"] == 24
    assert "english: train" in capsys.readouterr().out


def test_bad_inputs(corpus, tokenizer_dir, prepared, tmp_path):
    sources = corpus["sources"]

    def fails(match, **kwargs):
        args = dict(sources=sources, out=tmp_path / "out", tokenizer=tokenizer_dir, progress=False)
        with pytest.raises(UpcycleError, match=match):
            prepare(**{**args, **kwargs})
        assert not (tmp_path / "out").exists()
        assert not list(tmp_path.glob(".out.upcycle-tmp-*"))  # nothing half-written left behind

    fails("does not exist", sources={"english": [tmp_path / "missing.txt"]})
    fails("tokenizer path", tokenizer=tmp_path / "no-tokenizer")
    fails("no tokenizer.json", tokenizer=tmp_path)
    fails("already exists", out=prepared)
    fails("no domains", sources={})
    fails("no input paths", sources={"english": []})
    fails("domain name", sources={"en/glish": sources["english"]})
    fails("val_fraction", val_fraction=1.0)
    fails("EOS token", eos_token="<not-in-vocab>")

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n\n')
    fails("no non-empty documents", sources={"english": sources["english"], "empty": [empty]})
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    fails(r"bad.jsonl:2: not valid JSON", sources={"x": [bad_json]})
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"content": "hello"}\n')
    fails("string field 'text'", sources={"x": [no_field]})
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    fails("not UTF-8", sources={"x": [latin1]})
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    fails("contains no", sources={"x": [empty_dir]})
    (tmp_path / "taken").mkdir()
    with pytest.raises(UpcycleError, match="already exists"):
        prepare(sources, tmp_path / "taken", tokenizer_dir, progress=False)
    assert not list((tmp_path / "taken").iterdir())

    with pytest.raises(UpcycleError, match="not a prepared data directory"):
        MixtureLoader(tmp_path, seq_len=8, global_batch_size=2)
    with pytest.raises(UpcycleError, match="fewer than seq_len"):
        MixtureLoader(prepared, seq_len=10**7, global_batch_size=2)
    with pytest.raises(UpcycleError, match="divisible"):
        MixtureLoader(prepared, seq_len=8, global_batch_size=3, world_size=2)
    with pytest.raises(UpcycleError, match="unknown domains"):
        MixtureLoader(prepared, seq_len=8, global_batch_size=2, weights={"klingon": 1.0})
    state = MixtureLoader(prepared, seq_len=8, global_batch_size=2).state_dict()
    with pytest.raises(UpcycleError, match="seq_len"):
        MixtureLoader(prepared, seq_len=16, global_batch_size=2).load_state_dict(state)
    with pytest.raises(UpcycleError, match="probabilities"):
        MixtureLoader(prepared, seq_len=8, global_batch_size=2,
                      weights={"english": 1, "code": 1, "japanese": 1}).load_state_dict(state)


def test_force_replaces_existing_output(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "data"
    prepare({"code": corpus["sources"]["code"]}, out, tokenizer_dir, progress=False)
    prepare({"japanese": corpus["sources"]["japanese"]}, out, tokenizer_dir, force=True, progress=False)
    assert sorted(read_metadata(out)["domains"]) == ["japanese"]
    assert not (out / "code.train.bin").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_explicit_validation_sources(corpus, tokenizer_dir, tmp_path):
    """Pre-split files (as scripts/build_corpus.py writes them) go to their split unchanged, in order."""
    documents = corpus["documents"]["japanese"]
    train_file, val_file = tmp_path / "ja.train.jsonl", tmp_path / "ja.val.jsonl.gz"
    train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents[:70]), encoding="utf-8")
    with gzip.open(val_file, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps({"text": t}) + "\n" for t in documents[70:]))
    out = tmp_path / "data"
    prepare({"japanese": [train_file]}, out, tokenizer_dir, val_sources={"japanese": [val_file]}, val_fraction=0.5,
            progress=False)
    tokenizer, eos_id = load_tokenizer(tokenizer_dir)
    assert _decode_documents(tokenizer, read_tokens(out, "japanese", "train"), eos_id) == documents[:70]
    assert _decode_documents(tokenizer, read_tokens(out, "japanese", "val"), eos_id) == documents[70:]
    with pytest.raises(UpcycleError, match="have no training sources"):
        prepare({"japanese": [train_file]}, tmp_path / "x", tokenizer_dir, val_sources={"code": [val_file]})


def test_committed_sample_with_project_tokenizer(tmp_path):
    """The committed sample (data/sample) and tokenizer (assets/tokenizer) work together: every validation document
    round-trips exactly, and transformers loads the tokenizer with the same EOS id that prepare used."""
    from transformers import AutoTokenizer

    sample, tokenizer_dir = REPO / "data" / "sample", REPO / "assets" / "tokenizer"
    domains = ("english", "japanese", "code")
    out = tmp_path / "sample"
    metadata = prepare({d: [sample / f"{d}.val.jsonl.gz"] for d in domains}, out, tokenizer_dir, val_fraction=0.1,
                       progress=False)
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert hf.eos_token == EOS and hf.eos_token_id == metadata["eos_id"]
    assert metadata["vocab_size"] == len(hf) == 8192 and metadata["dtype"] == "uint16"
    tokenizer, eos_id = load_tokenizer(tokenizer_dir)
    for domain in domains:
        with gzip.open(sample / f"{domain}.val.jsonl.gz", "rt", encoding="utf-8") as handle:
            documents = [json.loads(line)["text"] for line in handle]
        decoded = [doc for split in ("train", "val")
                   for doc in _decode_documents(tokenizer, read_tokens(out, domain, split), eos_id)]
        assert sorted(decoded) == sorted(documents)


def test_a_list_flag_given_twice_keeps_both(tmp_path):
    """`--domain a=x --domain b=y` is two domains; argparse's plain nargs="+" used to keep only the last, silently."""
    from upcycle.cli import main

    repo = Path(__file__).resolve().parents[2]
    sample = repo / "data" / "sample"
    out = tmp_path / "out"
    main(["data", "prepare", str(out), str(repo / "assets" / "tokenizer"),
          "--domain", f"code={sample / 'code.val.jsonl.gz'}", "--domain", f"english={sample / 'english.val.jsonl.gz'}",
          "--val-fraction", "0.2"])
    assert sorted(json.loads((out / "data.json").read_text())["domains"]) == ["code", "english"]


def test_a_long_document_is_tokenized_in_bounded_pieces_to_the_same_tokens(tmp_path, monkeypatch):
    """One 50 MB single-line document peaked at 6.6 GB: the tokenizer's memory grows with the text of one call. Each
    call now gets at most PIECE_CHARS characters (here 2,000), and with the committed byte-level BPE the pieces give
    exactly the tokens of the whole document."""
    from upcycle.data import prepare as data
    from upcycle.data.prepare import document_pieces

    sample = REPO / "data" / "sample"
    with gzip.open(sample / "english.val.jsonl.gz", "rt", encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    long_document = "  ".join(texts)[:60_000] + "\n\n  indented  tail"  # whitespace runs at some cuts
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "long.jsonl").write_text(json.dumps({"text": long_document}) + "\n" +
                                                json.dumps({"text": "a short one"}) + "\n")
    tokenizer_dir = REPO / "assets" / "tokenizer"
    whole = prepare({"en": [tmp_path / "in" / "long.jsonl"]}, tmp_path / "whole", tokenizer_dir, val_fraction=0,
                    progress=False)

    longest = []
    real_load = data.load_tokenizer

    class Recording:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

        def encode_batch(self, texts, **kwargs):
            longest.append(max(map(len, texts)))
            return self.tokenizer.encode_batch(texts, **kwargs)

    def recording_load(*args, **kwargs):
        tokenizer, eos_id = real_load(*args, **kwargs)
        return Recording(tokenizer), eos_id

    monkeypatch.setattr(data, "load_tokenizer", recording_load)
    monkeypatch.setattr(data, "PIECE_CHARS", 2_000)
    pieced = prepare({"en": [tmp_path / "in" / "long.jsonl"]}, tmp_path / "pieced", tokenizer_dir, val_fraction=0,
                     progress=False)
    assert max(longest) <= 2_000
    assert pieced["domains"]["en"] == {**whole["domains"]["en"]}
    assert np.array_equal(read_tokens(tmp_path / "pieced", "en"), read_tokens(tmp_path / "whole", "en"))

    pieces = list(document_pieces(long_document, 2_000))
    assert "".join(p for p, _ in pieces) == long_document and [last for _, last in pieces][-1] is True
    assert all(len(p) <= 2_000 for p, _ in pieces) and not any(last for _, last in pieces[:-1])
    assert all(p.startswith(" ") and not p[1].isspace() for p, _ in pieces[1:-1] if len(p) > 1)
    assert [p for p, _ in document_pieces("x" * 5_000, 2_000)] == ["x" * 2_000, "x" * 2_000, "x" * 1_000]


# ---------------------------------------------------------------------------------------------------------------------
# Parquet (the Hugging Face Hub's dataset format)


def _write_parquet(path: Path, texts: list, *, column: str = "text", row_group_size: int = 7, **extra) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({column: texts, **extra})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_prepares_to_the_same_tokens_as_jsonl(corpus, tokenizer_dir, tmp_path):
    documents = corpus["documents"]["english"][:30]
    jsonl = tmp_path / "en.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(documents)))
    # a Hub dataset repository: data/ shards, a README and dataset metadata beside them (those are not documents)
    hub = tmp_path / "hub"
    _write_parquet(hub / "data" / "train-00000-of-00002.parquet", documents[:13], id=list(range(13)))
    _write_parquet(hub / "data" / "train-00001-of-00002.parquet", documents[13:], id=list(range(13, 30)))
    (hub / "README.md").write_text("---\nlicense: mit\n---\n# a dataset card\n")
    (hub / "dataset_info.json").write_text("{}")
    prepare({"en": [jsonl]}, tmp_path / "a", tokenizer_dir, val_fraction=0.1, progress=False)
    prepare({"en": [hub]}, tmp_path / "b", tokenizer_dir, val_fraction=0.1, progress=False)
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_tokens(tmp_path / "a", "en", split),
                                      read_tokens(tmp_path / "b", "en", split))
    assert read_metadata(tmp_path / "b")["domains"]["en"]["train"]["documents"] + \
        read_metadata(tmp_path / "b")["domains"]["en"]["val"]["documents"] == 30


def test_parquet_with_another_text_column_and_empty_rows(corpus, tokenizer_dir, tmp_path):
    from upcycle.data.prepare import iter_documents

    documents = corpus["documents"]["english"][:5]
    path = _write_parquet(tmp_path / "x.parquet", [documents[0], "", *documents[1:]], column="content")
    assert list(iter_documents(path, text_field="content")) == documents  # the empty row is skipped, as in JSONL


@pytest.mark.parametrize("case, message", [
    ("no column", "has no column 'text' (columns: content); choose the text column with --text-field"),
    ("not strings", "column 'text' holds int64, not strings"),
    ("null", "row group 1, row 2: 'text' is null, not a string"),
    ("corrupt", "cannot read"),
])
def test_bad_parquet_is_one_line_naming_the_file_and_nothing_is_written(corpus, tokenizer_dir, tmp_path, capsys,
                                                                        case, message):
    from helpers import assert_one_line_error, run_cli

    path = tmp_path / "in" / "bad.parquet"
    if case == "no column":
        _write_parquet(path, ["a", "b"], column="content")
    elif case == "not strings":
        _write_parquet(path, [1, 2])
    elif case == "null":  # rows 0-6 are group 0; row 2 of group 1 is null
        _write_parquet(path, [f"document {i}" for i in range(9)] + [None, "last"])
    else:
        _write_parquet(path, [f"document {i}" for i in range(50)])
        path.write_bytes(path.read_bytes()[:200] + b"\0" * 50 + path.read_bytes()[250:])
    out = tmp_path / "out"
    code, err = run_cli(capsys, "data", "prepare", str(out), str(tokenizer_dir), "--domain", f"en={path}")
    assert_one_line_error(code, err, message)
    assert str(path) in err and not out.exists()
