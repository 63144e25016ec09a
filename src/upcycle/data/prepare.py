"""Text -> flat token files per domain (`upcycle data prepare`), and the deterministic domain-mixture loader.

Prepared directory (`prepare` writes it, everything else only reads it):

    OUT/data.json              {"format": 1, "tokenizer": PATH, "vocab_size": V, "eos_id": ID,
                                "dtype": "uint16"|"uint32", "val_fraction": f, "seed": s,
                                "domains": {NAME: {"train": {"file": "NAME.train.bin", "tokens": N, "documents": n},
                                                   "val":   {"file": "NAME.val.bin",   "tokens": N, "documents": n},
                                                   "sources": [PATH, ...], "val_sources": [PATH, ...]}}}
    OUT/NAME.train.bin         raw little-endian token ids, no header: doc0 EOS doc1 EOS ... (each document ends in EOS)
    OUT/NAME.val.bin           same, for the held-out documents

uint16 is used when every id fits (V <= 65536), else uint32: half the disk and page cache for every small vocabulary.
Read a file with `read_tokens(dir, domain, split)` (a `numpy.memmap`).

Documents: a `.jsonl` file holds one document per line (the field `text_field`, default "text"); a `.parquet` file one
per row of the column `text_field` (streamed in record batches; needs pyarrow, the `parquet` extra); any other file is
one whole document (a README, a `.py` module, a manpage). JSONL and text may be gzip-compressed (`.gz`), or zstd
(`.zst`) if the `zstandard` package is installed. A directory means every non-hidden file below it, sorted, so the
document order - and with it the validation split - depends only on the paths given and the seed; a directory with
parquet files below it (a Hugging Face Hub dataset) means its parquet files only. Empty documents are skipped.

Validation split: per domain, either explicit files (`val_sources`), or exactly `max(1, round(val_fraction * docs))`
whole documents (0 when val_fraction is 0 or the domain has a single document) chosen by a seeded permutation of
document indices. Splitting by document, not by token range, keeps a held-out document from leaking into training
through its other half.

Loader (`MixtureLoader`), what a training step sees:
    loader = MixtureLoader(dir, seq_len=512, global_batch_size=64, seed=0, rank=r, world_size=W)
    tokens_BT = loader.next_batch()          # (64 // W, 513) int64; inputs tokens_BT[:, :-1], targets tokens_BT[:, 1:]
    state = loader.state_dict()              # small, JSON-able; `load_state_dict(state)` resumes exactly
Each domain's train stream is cut into non-overlapping chunks of seq_len + 1 tokens (stride seq_len, so every token is a
target exactly once per epoch); chunks are visited in a seeded random order that is re-drawn every epoch. Each row of a
global batch picks its domain at random with probability proportional to the domain weight (default: the domain's
size, as in the paper), from a generator seeded by (seed, step), and takes that domain's next chunk. Every rank computes
the whole global batch's plan (a few integers) and reads only its rows [rank * B/W, (rank + 1) * B/W), so the union of
the ranks' batches is exactly the one-process batch, and gradient accumulation over micro-batches of one rank's rows
matches too. Documents cross chunk boundaries freely (packing); the EOS tokens mark where they end.

Validation (`validation_batches`): per domain, up to `max_sequences` chunks spread evenly over the val stream, the same
for every run, so per-domain validation losses are comparable across runs and checkpoints.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import zlib
from typing import TYPE_CHECKING
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from upcycle.errors import UpcycleError
from upcycle.files import check_output, not_an_input, publish_dir, read_json, sha256_file
from upcycle.validation import check_arguments, short_repr

if TYPE_CHECKING:  # imported where tensors are made: the configs that import this module load without torch
    import torch

FORMAT_VERSION = 1
METADATA_FILE = "data.json"
SPLITS = ("train", "val")
# Tried in order when the tokenizer files do not name an EOS token.
_COMMON_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a valid pair decodes to one character, never to these


# ---------------------------------------------------------------------------------------------------------------------
# Reading source documents
# ---------------------------------------------------------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    """Open a possibly compressed UTF-8 file for reading text; `utf-8-sig` drops a leading byte-order mark."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UpcycleError(f"{path} is zstd-compressed but the `zstandard` package is not installed; "
                               "install it or decompress the file (gzip is supported without extras)") from None
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    for suffix in (".gz", ".zst"):
        name = name.removesuffix(suffix)
    return name.endswith(".jsonl")


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(".parquet")


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly, plus every non-hidden file below each directory (sorted, so the order is reproducible).
    A directory that holds parquet files anywhere below it is a dataset in the Hugging Face Hub's layout
    (`data/train-00000-of-00004.parquet`, ...): only its parquet files are documents then, not its README or JSON."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise UpcycleError(f"directory {path} contains no (non-hidden) files")
            if any(_is_parquet(p) for p in found):
                found = [p for p in found if _is_parquet(p)]
            files.extend(found)
        else:
            raise not_an_input("input path", path)
    return files


# Rows read from a parquet file at a time: memory stays bounded by one batch (plus one row group's compressed pages),
# whatever the file's size.
PARQUET_BATCH_ROWS = 1024


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    """The non-empty documents of a parquet file's `text_field` column, streamed one record batch at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UpcycleError(f"reading {path} needs pyarrow: pip install 'upcycle[parquet]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise UpcycleError(f"cannot read {path} as parquet: {' '.join(str(exc).split())[:300]}") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise UpcycleError(f"{path} has no column {text_field!r} (columns: {', '.join(columns[:20])}); choose the "
                           "text column with --text-field")
    kind = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UpcycleError(f"{path}: column {text_field!r} holds {kind}, not strings; choose the text column with "
                           "--text-field")
    with parquet:
        for group in range(parquet.num_row_groups):
            row = 0
            try:
                for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group],
                                                  columns=[text_field], use_threads=False):
                    for offset, text in enumerate(batch.column(0).to_pylist()):
                        if not isinstance(text, str):
                            raise UpcycleError(f"{path}: row group {group}, row {row + offset}: {text_field!r} is "
                                               f"{'null' if text is None else type(text).__name__}, not a string; "
                                               "drop such rows or choose another --text-field")
                        if text:
                            yield text
                    row += batch.num_rows
            except (OSError, pa.ArrowException) as exc:
                raise UpcycleError(f"cannot read {path}, row group {group}: {' '.join(str(exc).split())[:300]}; "
                                   "the file is damaged or truncated") from None


def iter_documents(path: Path, *, text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of one file: one per line for JSONL, one per row of the `text_field` column for
    parquet, the whole file otherwise."""
    if _is_parquet(path):
        yield from _iter_parquet(path, text_field)
        return
    try:
        with _open_text(path) as handle:
            if not _is_jsonl(path):
                text = handle.read()
                if text:
                    yield text
                return
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UpcycleError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise UpcycleError(f"{path}:{line_number}: expected a JSON object with a string field "
                                       f"{text_field!r} (choose another field with --text-field)")
                surrogate = _LONE_SURROGATE.search(record[text_field])
                if surrogate:  # a JSON \u escape may name half of a UTF-16 pair, which no tokenizer can encode
                    raise UpcycleError(f"{path}:{line_number}: the text holds a lone surrogate escape "
                                       f"(\\u{ord(surrogate.group()):04x}), which is not a Unicode character; "
                                       "fix or drop that line")
                if record[text_field]:
                    yield record[text_field]
    except UnicodeDecodeError as exc:
        raise UpcycleError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                           "convert it or leave it out of the inputs") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise UpcycleError(f"cannot read {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def _special_token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens either as a string or as {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def load_tokenizer(path: str | Path, eos_token: str | None = None):
    """Load a fast tokenizer from local files only and find its EOS id.

    `path` is a directory with `tokenizer.json` (any HF model or tokenizer directory), the `tokenizer.json` file itself,
    or a directory transformers can turn into a fast tokenizer offline. Returns `(tokenizers.Tokenizer, eos_id)`.
    We use the Rust tokenizer directly because its `encode_batch` runs on every core and skips Python per-token work.
    """
    from tokenizers import Tokenizer

    path = Path(path).expanduser()
    if not (path.is_file() or path.is_dir()):
        raise UpcycleError(f"{not_an_input('tokenizer path', path)}; pass a directory with tokenizer.json or the file")
    directory = path if path.is_dir() else path.parent
    json_file = path if path.is_file() else path / "tokenizer.json"
    if json_file.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(json_file))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed files
            raise UpcycleError(f"cannot load tokenizer from {json_file}: {exc}") from None
    else:
        try:
            from transformers import AutoTokenizer

            hf_tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as exc:  # transformers' reasons run over several lines; the first one names the cause
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(": ")
            raise UpcycleError(f"no tokenizer.json in {directory} and transformers could not load a tokenizer from it "
                               f"offline ({reason}); pass a directory with tokenizer.json or the file itself") from None
        if not getattr(hf_tokenizer, "is_fast", False):
            raise UpcycleError(f"the tokenizer in {directory} is not a fast tokenizer; save it with tokenizer.json")
        tokenizer = hf_tokenizer.backend_tokenizer

    candidates: list[str] = []
    if eos_token is not None:
        candidates.append(eos_token)
    else:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            config_file = directory / name
            if config_file.is_file():
                config = read_json(config_file, fix="fix the tokenizer files or pass --eos-token")
                found = _special_token_text(config.get("eos_token")) if isinstance(config, dict) else None
                if found:
                    candidates.append(found)
        candidates.extend(_COMMON_EOS_TOKENS)
    for candidate in candidates:
        eos_id = tokenizer.token_to_id(candidate)
        if eos_id is not None:
            return tokenizer, eos_id
    raise UpcycleError(f"cannot find an EOS token for the tokenizer at {path} (tried {candidates}); "
                       "pass --eos-token with a token from its vocabulary")


def calibration_token_ids(path: str | os.PathLike, tokenizer_dir: str | os.PathLike, max_tokens: int, *,
                          vocab_size: int | None = None) -> torch.Tensor:
    """Up to `max_tokens` token ids of the calibration file(s) of `--router-init data`, documents separated by EOS (as
    `data prepare`), tokenized with the tokenizer in `tokenizer_dir` (the dense source's); with `vocab_size`, an id
    the model has no embedding for is refused (a tokenizer that is not the model's)."""
    import torch

    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise UpcycleError(f"--router-init data tokenizes --calibration with the source's tokenizer, and "
                           f"{tokenizer_dir} has no tokenizer.json; add it to the source directory")
    files = expand_paths([path])
    tokenizer, eos_id = load_tokenizer(tokenizer_dir)
    ids: list[int] = []
    for file in files:
        for document in iter_documents(file):
            ids += tokenizer.encode(document, add_special_tokens=False).ids + [eos_id]
            if len(ids) >= max_tokens:
                break
        if len(ids) >= max_tokens:
            break
    if not any(i != eos_id for i in ids):
        raise UpcycleError(f"--calibration {path} has no text; pass a JSONL file with \"text\" fields or a plain text "
                           "file, with some text in it")
    ids = ids[:max_tokens]
    if vocab_size is not None and max(ids) >= vocab_size:
        raise UpcycleError(f"--calibration {path}: the tokenizer in {tokenizer_dir} gives token id {max(ids)}, but "
                           f"the model's vocabulary has {vocab_size} tokens; the tokenizer is not the model's")
    return torch.tensor(ids)


def valid_domain_name(name: str) -> bool:
    """A domain name becomes part of file names: letters, digits, '-' or '_', starting with a letter or digit."""
    return isinstance(name, str) and bool(_DOMAIN_NAME.match(name))


def choose_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32; an explicit request is checked, not trusted."""
    if requested not in ("auto", "uint16", "uint32"):
        raise UpcycleError(f"dtype must be auto, uint16 or uint32, not {requested!r}")
    if requested == "uint32" or (requested == "auto" and vocab_size > 2**16):
        return np.dtype(np.uint32)
    if vocab_size > 2**16:
        raise UpcycleError(f"vocabulary of {vocab_size} ids does not fit uint16; use --dtype uint32 or auto")
    return np.dtype(np.uint16)


# ---------------------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------------------


def _domain_seed(name: str) -> int:
    """A stable per-domain number (Python's hash() is salted per process, crc32 is not)."""
    return zlib.crc32(name.encode())


def choose_validation(num_documents: int, val_fraction: float, seed: int, domain: str) -> np.ndarray:
    """Boolean mask over document indices: True for the held-out validation documents. Pure function of its inputs."""
    if val_fraction <= 0 or num_documents < 2:
        num_val = 0
    else:
        num_val = min(num_documents - 1, max(1, round(val_fraction * num_documents)))
    rng = np.random.default_rng([seed, _domain_seed(domain)])
    mask = np.zeros(num_documents, dtype=bool)
    mask[rng.permutation(num_documents)[:num_val]] = True
    return mask


def _parse_sources(sources: Mapping[str, Sequence[str | Path]]) -> dict[str, list[Path]]:
    if not sources:
        raise UpcycleError("no domains given; pass at least one, e.g. --domain english=corpus/en")
    files = {}
    for name, paths in sources.items():
        if not valid_domain_name(name):
            raise UpcycleError(f"domain name {name!r} must be letters, digits, '-' or '_' (it becomes a file name)")
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if not paths:
            raise UpcycleError(f"domain {name!r} has no input paths")
        files[name] = expand_paths(paths)
    return files


def _refuse_repeated_files(files: Mapping[str, list[Path]], val_files: Mapping[str, list[Path]]) -> None:
    """A file read twice is counted twice, and one in a domain's training and validation inputs leaks into its
    validation loss: refuse any file (after resolving symlinks, and directories into their files) given twice."""
    seen: dict[Path, str] = {}
    for split, group in (("training", files), ("validation", val_files)):
        for name, paths in group.items():
            for path in paths:
                where, real = f"{split} input of domain {name!r}", path.resolve()
                if real in seen:
                    raise UpcycleError(f"{path} is given twice (as {seen[real]} and as {where}); "
                                       "list each input file once")
                seen[real] = where


def _refuse_output_in_input_dirs(out: Path, groups) -> None:
    """An OUT inside an input directory would be read back as input (its .bin files as text) by the next run."""
    out_real = out.resolve()
    for paths in groups:
        for path in [paths] if isinstance(paths, (str, Path)) else paths:
            directory = Path(path).expanduser().resolve()
            if directory.is_dir() and directory in out_real.parents:
                raise UpcycleError(f"OUT {out} lies inside the input directory {path}; its files would be read as "
                                   "input by the next run, choose an OUT outside the inputs")


def prepare(
    sources: Mapping[str, Sequence[str | Path] | str | Path],
    out: str | Path,
    tokenizer: str | Path,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    dtype: str = "auto",
    text_field: str = "text",
    eos_token: str | None = None,
    force: bool = False,
    val_sources: Mapping[str, Sequence[str | Path] | str | Path] | None = None,
    batch_documents: int = 256,
    progress: bool = True,
) -> dict:
    """Tokenize each domain's documents into `OUT/{domain}.{train,val}.bin` and write `OUT/data.json`; return its dict.

    `val_sources` gives some domains an explicit, already held-out validation set (e.g. the `*.val.jsonl.gz` files of
    scripts/build_corpus.py); those domains take all of `sources` as training data and ignore `val_fraction`.

    The output appears atomically: everything is written to a temporary sibling directory that is renamed into place
    only when complete, so an interrupted run never leaves a half-written directory that looks usable.
    """
    check_arguments(prepare, locals(), lambda name: "--" + name.replace("_", "-"))  # types; no NaN/Inf
    out = Path(out).expanduser()
    if not 0 <= val_fraction < 1:
        raise UpcycleError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = _parse_sources(sources)
    val_files = _parse_sources(val_sources) if val_sources else {}
    inputs = [*(path for group in (files, val_files) for paths in group.values() for path in paths), tokenizer]
    check_output(out, force=force, inputs=inputs, flag="OUT")
    _refuse_repeated_files(files, val_files)
    _refuse_output_in_input_dirs(out, [*sources.values(), *(val_sources or {}).values()])
    if set(val_files) - set(files):
        raise UpcycleError(f"validation sources for {sorted(set(val_files) - set(files))} have no training sources")
    tok, eos_id = load_tokenizer(tokenizer, eos_token)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    token_dtype = choose_dtype(vocab_size, dtype)

    with publish_dir(out, force=force, inputs=inputs, flag="OUT") as tmp:
        domains = {}
        for name, domain_files in files.items():
            domains[name] = _prepare_domain(
                name, domain_files, val_files.get(name, []), tmp, tok, eos_id, token_dtype,
                val_fraction=val_fraction, seed=seed, text_field=text_field,
                batch_documents=batch_documents, progress=progress,
            )
        tokenizer_path = Path(tokenizer).expanduser().resolve()
        tokenizer_json = tokenizer_path / "tokenizer.json" if tokenizer_path.is_dir() else tokenizer_path
        metadata = {
            "format": FORMAT_VERSION,
            "tokenizer": str(tokenizer_path),
            # Lets a trainer check that a model and a data directory share one vocabulary.
            "tokenizer_sha256": sha256_file(tokenizer_json) if tokenizer_json.is_file() else None,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "dtype": token_dtype.name,
            "val_fraction": val_fraction,
            "seed": seed,
            "text_field": text_field,
            "domains": domains,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


# The tokenizer's working memory grows with the text of one call (about 180 bytes per character were measured on a
# 10 MB single-line document with the committed BPE), so a document is tokenized in pieces of at most PIECE_CHARS
# characters and a batch holds at most BATCH_CHARS: memory per document is bounded whatever its length.
PIECE_CHARS = 1 << 18
BATCH_CHARS = 1 << 20


def document_pieces(text: str, max_chars: int) -> Iterator[tuple[str, bool]]:
    """(piece, is the last piece) of a document, each at most `max_chars` characters, for tokenizing a long document
    piece by piece. A piece ends before a single space that follows a non-space character (looked for in the second
    half of the window), where the usual pre-tokenizers split anyway (GPT-2-style byte-level BPE and whitespace
    splitters attach that space to the next word), so for them the pieces' tokens are the whole document's; only a
    window without such a space is cut at max_chars, splitting one word."""
    start = 0
    while len(text) - start > max_chars:
        end, low = start + max_chars, start + max_chars // 2
        cut = text.rfind(" ", low, end)
        while cut > low and text[cut - 1].isspace():  # inside a run of whitespace: look further back
            cut = text.rfind(" ", low, cut)
        cut = cut if cut > low else end
        yield text[start:cut], False
        start = cut
    yield text[start:], True


def _prepare_domain(name, files, val_files, tmp, tok, eos_id, token_dtype, *, val_fraction, seed, text_field,
                    batch_documents, progress) -> dict:
    """Two passes: count documents (cheap, no tokenizing) to draw an exact-size validation set, then tokenize."""
    from tqdm.auto import tqdm

    def count(paths):
        return sum(1 for path in paths for _ in iter_documents(path, text_field=text_field))

    num_train_documents = count(files)
    if num_train_documents == 0:
        raise UpcycleError(f"domain {name!r} has no non-empty documents in {[str(f) for f in files]}")
    if val_files:
        num_val_documents = count(val_files)
        if num_val_documents == 0:
            raise UpcycleError(f"domain {name!r}: validation sources {[str(f) for f in val_files]} hold no documents")
        is_val = np.repeat([False, True], [num_train_documents, num_val_documents])
    else:
        is_val = choose_validation(num_train_documents, val_fraction, seed, name)
    num_documents = len(is_val)

    counts = {split: {"file": f"{name}.{split}.bin", "tokens": 0, "documents": 0} for split in SPLITS}
    handles = {split: open(tmp / counts[split]["file"], "wb") for split in SPLITS}
    eos = np.array([eos_id], dtype=np.int64)

    def flush(batch: list[tuple[int, str, bool]]) -> int:
        """Tokenize and write a batch of (document index, piece, is its last piece); returns documents completed."""
        encodings = tok.encode_batch([piece for _, piece, _ in batch], add_special_tokens=False)
        done = 0
        for (index, _, last), encoding in zip(batch, encodings):
            split = "val" if is_val[index] else "train"
            ids = np.asarray(encoding.ids, dtype=np.int64)
            if last:
                ids = np.concatenate([ids, eos])
                counts[split]["documents"] += 1
                done += 1
            handles[split].write(ids.astype(token_dtype).tobytes())
            counts[split]["tokens"] += len(ids)
        return done

    try:
        with tqdm(total=num_documents, desc=f"tokenizing {name}", unit="doc", disable=not progress) as bar:
            batch: list[tuple[int, str, bool]] = []
            batch_chars = 0
            index = 0
            for path in [*files, *val_files]:
                for text in iter_documents(path, text_field=text_field):
                    for piece, last in document_pieces(text, PIECE_CHARS):
                        batch.append((index, piece, last))
                        batch_chars += len(piece)
                        if len(batch) == batch_documents or batch_chars >= BATCH_CHARS:
                            bar.update(flush(batch))
                            batch, batch_chars = [], 0
                    index += 1
            bar.update(flush(batch))
    finally:
        for handle in handles.values():
            handle.close()
    if index != num_documents:
        raise UpcycleError(f"domain {name!r}: inputs changed while reading ({num_documents} then {index} documents)")
    return {**counts, "sources": [str(f) for f in files], "val_sources": [str(f) for f in val_files]}


def parse_domain_args(values: list[str] | None, flag: str) -> dict[str, list[str]]:
    """['english=a.jsonl.gz,docs/', 'code=src/'] -> {'english': ['a.jsonl.gz', 'docs/'], 'code': ['src/']}."""
    out: dict[str, list[str]] = {}
    for value in values or []:
        name, sep, paths = value.partition("=")
        if not sep or not name.strip() or not paths.strip():
            raise UpcycleError(f"{flag} {value!r} is not NAME=PATH[,PATH...]; e.g. {flag} english=corpus/en.jsonl.gz")
        name = name.strip()
        if name in out:  # two lists for one domain is almost always a typo for another domain's name
            raise UpcycleError(f"{flag} names domain {name!r} twice; give all its paths once, "
                               f"e.g. {flag} {name}=PATH,PATH")
        out[name] = [p.strip() for p in paths.split(",") if p.strip()]
    return out



# ---------------------------------------------------------------------------------------------------------------------
# Reading a prepared directory
# ---------------------------------------------------------------------------------------------------------------------


def read_metadata(data_dir: str | Path) -> dict:
    """The parsed data.json of a prepared directory, checked for the fields the loaders rely on."""
    path = Path(data_dir).expanduser() / METADATA_FILE
    if not path.is_file():
        raise UpcycleError(f"{path.parent} is not a prepared data directory (no {METADATA_FILE}); "
                           "run `upcycle data prepare` first")
    metadata = read_json(path, fix="re-run `upcycle data prepare`")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_VERSION:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise UpcycleError(f"{path} has format {found}, this version reads {FORMAT_VERSION}; "
                           "re-run `upcycle data prepare`")
    return metadata


def read_tokens(data_dir: str | Path, domain: str, split: str = "train", metadata: dict | None = None) -> np.ndarray:
    """A read-only memmap of one domain's split (an empty array for an empty split: mmap cannot map 0 bytes)."""
    metadata = read_metadata(data_dir) if metadata is None else metadata
    if domain not in metadata["domains"]:
        raise UpcycleError(f"domain {domain!r} not in {data_dir}; it has {sorted(metadata['domains'])}")
    if split not in SPLITS:
        raise UpcycleError(f"split must be one of {SPLITS}, not {split!r}")
    info = metadata["domains"][domain][split]
    dtype = np.dtype(metadata["dtype"])
    path = Path(data_dir).expanduser() / info["file"]
    if not path.is_file() or path.stat().st_size != info["tokens"] * dtype.itemsize:
        raise UpcycleError(f"{path} is missing or its size does not match {METADATA_FILE}; re-run prepare")
    if info["tokens"] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(info["tokens"],))


def check_data_fits(data_dir: str | Path | None, *, vocab_size: int, max_seq_len: int, seq_len: int,
                    seq_len_name: str = "seq_len", tokenizer: str | Path | None = None,
                    tokenizer_name: str = "tokenizer", chunk_tokens: int = 1 << 24) -> dict | None:
    """The one check that data fits a model with `vocab_size` ids and `max_seq_len` positions, before any work:
    sequences no longer than the model's, and either prepared data (`data_dir`: a tokenizer vocabulary no larger than
    the model's, and every token id < vocab_size in every token file, each file's maximum scanned once in chunks of
    `chunk_tokens`) or, before raw text is tokenized (`data_dir` None), the vocabulary of `tokenizer` (called
    `tokenizer_name` in messages). Returns the prepared data's metadata (None for raw text)."""
    if seq_len > max_seq_len:
        raise UpcycleError(f"{seq_len_name} {seq_len} exceeds the model's max_seq_len {max_seq_len}")
    if data_dir is None:
        if tokenizer is None:
            raise UpcycleError("check_data_fits needs a prepared data directory or the tokenizer of the raw text")
        ids = load_tokenizer(tokenizer)[0].get_vocab_size(with_added_tokens=True)
        if ids > vocab_size:
            raise UpcycleError(f"{tokenizer_name} {tokenizer} has {ids} token ids but the model's vocab_size is "
                               f"{vocab_size}; use a matching tokenizer or a larger model.vocab_size")
        return None
    metadata = read_metadata(data_dir)
    if metadata["vocab_size"] > vocab_size:
        raise UpcycleError(f"{data_dir} was tokenized with {metadata['vocab_size']} token ids but the model has only "
                           f"{vocab_size}; prepare the data with the model's tokenizer (or a larger vocab_size)")
    for domain in sorted(metadata["domains"]):
        for split in SPLITS:
            tokens = read_tokens(data_dir, domain, split, metadata)
            top = max((int(tokens[i:i + chunk_tokens].max()) for i in range(0, len(tokens), chunk_tokens)), default=-1)
            if top >= vocab_size:
                file = Path(data_dir).expanduser() / metadata["domains"][domain][split]["file"]
                raise UpcycleError(f"{file} holds token id {top}, beyond the model's vocab_size {vocab_size}; the "
                                   "file does not match data.json, re-run `upcycle data prepare`")
    return metadata


def num_chunks(num_tokens: int, seq_len: int) -> int:
    """Chunks of seq_len + 1 tokens at stride seq_len: consecutive chunks share one token (last target = next input)."""
    return max(0, (num_tokens - 1) // seq_len)


def check_weights(weights: Mapping[str, float], name: str = "weights") -> None:
    """Domain sampling weights: finite numbers >= 0, at least one positive. The one check of them: a config's data
    section runs it when validated, and MixtureLoader for weights handed to it directly (the Python API). `w < 0`
    alone would let NaN through, and `w > 0` would then silently leave that domain out."""
    numbers = isinstance(weights, Mapping) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf") for w in weights.values())
    if not numbers:
        raise UpcycleError(f"{name} must be finite numbers >= 0, got {short_repr(weights)}")
    if not any(w > 0 for w in weights.values()):
        raise UpcycleError(f"{name}: every weight is 0; give at least one domain a positive weight")


class MixtureLoader:
    """Deterministic, resumable, rank-sharded stream of packed sequences from a weighted mixture of domains.

    Args:
        data_dir: a directory written by `prepare`.
        seq_len: tokens per training sequence; each row holds seq_len + 1 tokens (inputs and shifted targets).
        global_batch_size: rows per optimizer step summed over all ranks; must be divisible by world_size.
        seed: fixes the chunk order of every domain and the domain of every row.
        weights: domain -> sampling weight (normalized here). None: proportional to each domain's train tokens, as in
            the paper. Domains left out or given 0 are not used.
        rank, world_size: this process's share of each global batch (rows rank*B/W .. (rank+1)*B/W - 1).
        split: "train" normally; "val" lets tests and ablations stream held-out data the same way.

    The position is `step` (global batches drawn so far) plus each domain's count of chunks consumed; `state_dict()`
    returns both, and `load_state_dict()` continues exactly where it was, on any number of ranks.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int = 0,
        weights: Mapping[str, float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
    ):
        if seq_len < 1 or global_batch_size < 1:
            raise UpcycleError(f"seq_len and global_batch_size must be positive, got {seq_len} and {global_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UpcycleError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch_size % world_size:
            raise UpcycleError(f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}")
        self.data_dir = Path(data_dir).expanduser()
        self.metadata = read_metadata(self.data_dir)
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.rank, self.world_size, self.split = rank, world_size, split
        self.local_batch_size = global_batch_size // world_size

        available = self.metadata["domains"]
        if weights is None:
            weights = {name: info[split]["tokens"] for name, info in available.items()}
        else:
            check_weights(weights)
        unknown = sorted(set(weights) - set(available))
        if unknown:
            raise UpcycleError(f"weights name unknown domains {unknown}; {self.data_dir} has {sorted(available)}")
        # Sorted names make the domain index (and so every draw) independent of dict order in configs.
        self.domains = sorted(name for name, w in weights.items() if w > 0)
        if not self.domains:
            raise UpcycleError(f"{self.data_dir} holds no {split} tokens in any domain")
        self.tokens = {name: read_tokens(self.data_dir, name, split, self.metadata) for name in self.domains}
        self.num_chunks = {name: num_chunks(len(self.tokens[name]), seq_len) for name in self.domains}
        too_small = [name for name in self.domains if self.num_chunks[name] == 0]
        if too_small:
            raise UpcycleError(f"domains {too_small} have fewer than seq_len + 1 = {seq_len + 1} {split} tokens; "
                               "lower seq_len, add data, or give them weight 0")
        total = float(sum(weights[name] for name in self.domains))
        self.probabilities = np.array([weights[name] / total for name in self.domains])
        self.step = 0
        self.consumed = {name: 0 for name in self.domains}
        self._order_cache: dict[str, tuple[int, np.ndarray]] = {}

    # -- the plan: which (domain, chunk) fills each row of a global batch; identical on every rank -------------------

    def _chunk_order(self, name: str, epoch: int) -> np.ndarray:
        """The seeded visiting order of a domain's chunks in one epoch (cached: only the current epoch is kept)."""
        cached = self._order_cache.get(name)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, _domain_seed(name), epoch])
            cached = (epoch, rng.permutation(self.num_chunks[name]))
            self._order_cache[name] = cached
        return cached[1]

    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """Domain index and chunk index of every row of the next global batch; advances the position."""
        rng = np.random.default_rng([self.seed, self.step])
        domain_ids = rng.choice(len(self.domains), size=self.global_batch_size, p=self.probabilities)
        chunk_ids = np.empty(self.global_batch_size, dtype=np.int64)
        for row, domain_id in enumerate(domain_ids):
            name = self.domains[domain_id]
            position = self.consumed[name]
            epoch, offset = divmod(position, self.num_chunks[name])
            chunk_ids[row] = self._chunk_order(name, epoch)[offset]
            self.consumed[name] = position + 1
        self.step += 1
        return domain_ids, chunk_ids

    def next_batch_with_domains(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the next global batch: tokens (B_local, seq_len + 1) int64 and domain index (B_local,)
        into `self.domains` (for per-domain training loss or routing statistics)."""
        import torch

        domain_ids, chunk_ids = self._plan()
        rows = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        tokens_BT = np.empty((self.local_batch_size, self.seq_len + 1), dtype=np.int64)
        for out_row, (domain_id, chunk_id) in enumerate(zip(domain_ids[rows], chunk_ids[rows])):
            start = int(chunk_id) * self.seq_len
            tokens_BT[out_row] = self.tokens[self.domains[domain_id]][start:start + self.seq_len + 1]
        return torch.from_numpy(tokens_BT), torch.from_numpy(domain_ids[rows].astype(np.int64))

    def next_batch(self) -> torch.Tensor:
        """This rank's rows of the next global batch, (global_batch_size // world_size, seq_len + 1) int64."""
        return self.next_batch_with_domains()[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def epochs(self) -> dict[str, float]:
        """How many passes over each domain's split have been consumed so far (for logging)."""
        return {name: self.consumed[name] / self.num_chunks[name] for name in self.domains}

    # -- checkpointing ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-able position plus the settings it is only meaningful with (checked on load)."""
        return {
            "step": self.step,
            "consumed": dict(self.consumed),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "split": self.split,
            "domains": list(self.domains),
            "probabilities": [float(p) for p in self.probabilities],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from `state`; rank and world_size may differ from the run that saved it, the rest may not. A state
        that holds values of the wrong kind (a damaged trainer_state.json) is one UpcycleError."""
        if not isinstance(state, Mapping):
            raise UpcycleError(f"data loader state is {type(state).__name__}, not a JSON object; the checkpoint's "
                               "trainer_state.json is damaged")
        expected = self.state_dict()
        for key in ("seed", "seq_len", "global_batch_size", "split", "domains"):
            if state.get(key) != expected[key]:
                raise UpcycleError(f"data loader state was saved with {key}={state.get(key)!r} but this loader has "
                                   f"{key}={expected[key]!r}; resume with the same data settings")
        counts = state.get("consumed")
        if (type(state.get("step")) is not int or state["step"] < 0 or not isinstance(counts, Mapping)
                or not all(type(counts.get(name)) is int and counts[name] >= 0 for name in self.domains)):
            raise UpcycleError(f"data loader state: step must be a count and consumed a count per domain, got step "
                               f"{state.get('step')!r}, consumed {counts!r}; the checkpoint's trainer_state.json is "
                               "damaged")
        probabilities = state.get("probabilities")
        if (not isinstance(probabilities, list) or len(probabilities) != len(expected["probabilities"])
                or not all(type(p) in (int, float) for p in probabilities)):
            raise UpcycleError(f"data loader state: probabilities must be {len(expected['probabilities'])} numbers, "
                               f"got {probabilities!r}; the checkpoint's trainer_state.json is damaged")
        if not np.allclose(state["probabilities"], expected["probabilities"], rtol=1e-9, atol=1e-12):
            raise UpcycleError(f"data loader state was saved with domain probabilities {state['probabilities']} but "
                               f"this loader has {expected['probabilities']}; resume with the same weights and data")
        self.step = int(state["step"])
        self.consumed = {name: int(state["consumed"][name]) for name in self.domains}


def validation_chunk_ids(num_tokens: int, seq_len: int, max_sequences: int) -> np.ndarray:
    """Which chunks (of seq_len + 1 tokens at stride seq_len) of a validation stream are scored: up to
    `max_sequences` spread evenly over it, all of them when there are fewer. Chunk c holds tokens c * seq_len ..
    c * seq_len + seq_len and scores the targets c * seq_len + 1 .. c * seq_len + seq_len."""
    count = num_chunks(num_tokens, seq_len)
    return np.unique(np.linspace(0, count - 1, num=min(count, max_sequences)).round().astype(np.int64))


def validation_batches(
    data_dir: str | Path,
    *,
    seq_len: int,
    batch_size: int,
    max_sequences: int = 64,
    domains: Sequence[str] | None = None,
    split: str = "val",
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, list[torch.Tensor]]:
    """Per domain: the fixed validation sequences, as batches of at most `batch_size` rows of seq_len + 1 tokens.

    Up to `max_sequences` non-overlapping chunks spread evenly over the domain's val stream (all of them if there are
    fewer): independent of any seed, so every run and checkpoint is scored on the same tokens. With world_size > 1,
    rank r gets batches r, r + W, ...; sum losses and token counts across ranks before dividing. A domain whose val
    split is shorter than seq_len + 1 tokens maps to an empty list.
    """
    import torch

    if seq_len < 1 or batch_size < 1 or max_sequences < 1:
        raise UpcycleError("seq_len, batch_size and max_sequences must be positive")
    metadata = read_metadata(data_dir)
    names = sorted(metadata["domains"]) if domains is None else list(domains)
    batches: dict[str, list[torch.Tensor]] = {}
    for name in names:
        tokens = read_tokens(data_dir, name, split, metadata)
        count = num_chunks(len(tokens), seq_len)
        chunk_ids = validation_chunk_ids(len(tokens), seq_len, max_sequences)
        rows = np.stack([tokens[c * seq_len:c * seq_len + seq_len + 1] for c in chunk_ids]).astype(np.int64) \
            if count else np.zeros((0, seq_len + 1), dtype=np.int64)
        all_batches = [torch.from_numpy(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
        batches[name] = all_batches[rank::world_size]
    return batches


_FINGERPRINT_BLOCKS, _FINGERPRINT_BLOCK_BYTES = 16, 1 << 16


def fingerprint(data_dir: str | Path) -> str:
    """A cheap identity of a prepared data directory: sha256 of data.json and, for each token file, its size and 16
    blocks of 64 KiB spread over it. Re-preparing the directory in place with other text changes it (the token counts
    or the sampled bytes), while reading it costs ~1 MB per file whatever the data's size."""
    data_dir = Path(data_dir)
    digest = hashlib.sha256((data_dir / METADATA_FILE).read_bytes())
    for file in sorted(data_dir.glob("*.bin")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            for index in range(_FINGERPRINT_BLOCKS):
                f.seek(size * index // _FINGERPRINT_BLOCKS)
                digest.update(f.read(_FINGERPRINT_BLOCK_BYTES))
    return digest.hexdigest()
