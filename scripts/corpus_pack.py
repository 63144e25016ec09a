"""Carry a prepared corpus to a GPU machine in its smallest measured form, and get it back bit for bit.

    python scripts/corpus_pack.py pack runs/corpus-prepared runs/corpus-packed     # here, once (~2 min on 2 cores)
    python scripts/corpus_pack.py ensure runs/corpus-prepared                      # there, before a piece runs

Why: a device run carries at most 64 MiB (tracked files included), and the full study's corpus does not fit as text
in gzip (45.2 MB). Its prepared token files (uint16, 119 MB) in xz at the strongest preset are smaller than its text in
xz, and need no tokenizing on arrival (docs/experiments/replication/pieces.md has the sizes).

`pack` writes every file of the prepared directory as FILE.xz plus packed.json (each file's sha256 and size);
`unpack` decompresses into a new directory, checks every file against packed.json, and publishes the directory only
when all match; `ensure PREPARED` does nothing when PREPARED/data.json exists, else unpacks --packed (default
runs/corpus-packed), else prepares from --text (default runs/corpus, the text `build_corpus.py` writes), else stops
naming both.
"""

from __future__ import annotations

import argparse
import lzma
import shutil
import sys
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.files import atomic_write_json, publish_dir, read_json, sha256_file

MANIFEST = "packed.json"
DOMAINS = ("english", "japanese", "code")  # build_corpus.py's domains, the study's data
_BLOCK = 1 << 24


def pack(prepared: Path, packed: Path, *, force: bool = False) -> dict:
    """Compress every file of `prepared` (a directory `upcycle data prepare` wrote) into `packed`."""
    if not (prepared / "data.json").is_file():
        raise UpcycleError(f"{prepared} is not a prepared data directory (no data.json); run `upcycle data prepare`")
    files = sorted(p for p in prepared.iterdir() if p.is_file())
    record = {"format": 1, "files": {}}
    with publish_dir(packed, force=force, inputs=[prepared]) as tmp:
        for path in files:
            with open(path, "rb") as src, lzma.open(tmp / f"{path.name}.xz", "wb",
                                                      preset=9 | lzma.PRESET_EXTREME) as dst:
                shutil.copyfileobj(src, dst, _BLOCK)
            record["files"][path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size,
                                          "packed_bytes": (tmp / f"{path.name}.xz").stat().st_size}
        atomic_write_json(tmp / MANIFEST, record)
    return record


def unpack(packed: Path, prepared: Path, *, force: bool = False) -> dict:
    """Decompress `packed` into `prepared`; every file must match packed.json, or nothing is written."""
    record = read_json(packed / MANIFEST, fix=f"re-run `python scripts/corpus_pack.py pack PREPARED {packed}`")
    if not isinstance(record, dict) or record.get("format") != 1 or not isinstance(record.get("files"), dict):
        raise UpcycleError(f"{packed / MANIFEST} is not a corpus_pack.py manifest; re-run `corpus_pack.py pack`")
    with publish_dir(prepared, force=force, inputs=[packed]) as tmp:
        for name, info in sorted(record["files"].items()):
            source = packed / f"{name}.xz"
            if not source.is_file():
                raise UpcycleError(f"{source} is missing; re-run `corpus_pack.py pack` and carry all of {packed}")
            try:
                with lzma.open(source, "rb") as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, _BLOCK)
            except (lzma.LZMAError, EOFError) as exc:
                raise UpcycleError(f"{source} is not a complete xz file ({exc}); re-run `corpus_pack.py pack`") \
                    from None
            size, digest = (tmp / name).stat().st_size, sha256_file(tmp / name)
            if size != info["bytes"] or digest != info["sha256"]:
                raise UpcycleError(f"{source} unpacks to {size} bytes with sha256 {digest[:12]}, not the "
                                   f"{info['bytes']} bytes and {info['sha256'][:12]} of {MANIFEST}; re-run "
                                   "`corpus_pack.py pack`")
    return record


def ensure(prepared: Path, *, packed: Path, text: Path, tokenizer: Path) -> str:
    """Make `prepared` exist: already there, unpacked from `packed`, or prepared from the text in `text`.
    Returns which ("present", "unpacked", "prepared")."""
    if (prepared / "data.json").is_file():
        return "present"
    if (packed / MANIFEST).is_file():
        unpack(packed, prepared)
        return "unpacked"
    if all((text / f"{d}.{split}.jsonl.gz").is_file() for d in DOMAINS for split in ("train", "val")):
        from upcycle.data.prepare import prepare  # the tokenizer stack only when text has to be tokenized

        prepare({d: text / f"{d}.train.jsonl.gz" for d in DOMAINS}, prepared, tokenizer,
                val_sources={d: text / f"{d}.val.jsonl.gz" for d in DOMAINS})
        return "prepared"
    raise UpcycleError(f"no {prepared}/data.json, no {packed}/{MANIFEST} and no {text}/*.{{train,val}}.jsonl.gz: "
                       "carry the packed corpus (docs/experiments/replication/pieces.md, 'What has to travel')")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, what in (("pack", "PREPARED -> PACKED"), ("unpack", "PACKED -> PREPARED")):
        sub = commands.add_parser(name, help=f"{what} (refuses an existing output unless --force)")
        sub.add_argument("source", type=Path)
        sub.add_argument("out", type=Path)
        sub.add_argument("--force", action="store_true", help="replace an existing output directory")
    sub = commands.add_parser("ensure", help="make PREPARED exist: keep it, unpack --packed, or prepare --text")
    sub.add_argument("prepared", type=Path)
    sub.add_argument("--packed", type=Path, default=Path("runs/corpus-packed"))
    sub.add_argument("--text", type=Path, default=Path("runs/corpus"))
    sub.add_argument("--tokenizer", type=Path, default=Path("assets/tokenizer"))
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            record = pack(args.source, args.out, force=args.force)
            total = sum(f["packed_bytes"] for f in record["files"].values())
            raw = sum(f["bytes"] for f in record["files"].values())
            print(f"corpus_pack.py: {len(record['files'])} files, {raw / 1e6:.1f} MB -> {total / 1e6:.1f} MB "
                  f"in {args.out}")
        elif args.command == "unpack":
            record = unpack(args.source, args.out, force=args.force)
            print(f"corpus_pack.py: {len(record['files'])} files checked into {args.out}")
        else:
            how = ensure(args.prepared, packed=args.packed, text=args.text, tokenizer=args.tokenizer)
            print(f"corpus_pack.py: {args.prepared} {how}")
    except UpcycleError as exc:
        print(f"corpus_pack.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
