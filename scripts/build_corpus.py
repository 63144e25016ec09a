"""Build the three-domain text corpus (English, Japanese, code) from Debian packages, reproducibly and offline.

    python scripts/build_corpus.py --out runs/corpus --cache runs/corpus-cache
    python scripts/build_corpus.py --out runs/corpus --cache runs/corpus-cache --sample-out data/sample \
        --sample-bytes 4000000

Why Debian packages: they are the one large, versioned, licensed-for-redistribution text source reachable from this
machine (no web, no Hugging Face hub), and `apt-get download` + `dpkg-deb -x` make every byte traceable to a package
version and a .deb sha256, which `manifest.json` records.

Steps: `apt-get download` each package into CACHE/debs (skipped when the .deb is already there), `dpkg-deb -x` into
CACHE/extract/PACKAGE, pick the files each package contributes (the SOURCES table below), turn them into plain text
(HTML and GNOME Mallard XML with the stdlib html.parser, roff manpages by stripping macros and escapes, POD by
stripping its commands, reStructuredText / asciidoc / Python as they are), drop short documents, drop Japanese-domain
documents with almost no Japanese script (untranslated pages), remove exact duplicates (sha256 of whitespace-normalized
text, across all domains), and split each domain into train / validation by that same hash, so the split does not
depend on file order and never changes when other documents are added or removed.

Output: OUT/{english,japanese,code}.{train,val}.jsonl.gz with one {"text", "source"} record per document, and
OUT/manifest.json (packages, versions, .deb sha256, per-domain document / character / byte counts, settings).
With --sample-out, also a small deterministic subset of each split (documents in hash order until --sample-bytes of
UTF-8 text for train, a twentieth of that for validation) for tests and the demo.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from upcycle.files import sha256_file

DOMAINS = ("english", "japanese", "code")


@dataclass(frozen=True)
class Source:
    """Files of one Debian package that feed one domain: a glob under the extracted root, and how to read them."""

    package: str
    domain: str
    pattern: str
    kind: str  # html | mallard | roff | pod | text | python | gcide
    exclude: str | None = None  # regex on the relative path


SOURCES = (
    # English
    Source("dict-gcide", "english", "usr/share/dictd/gcide.dict.dz", "gcide"),
    # lilypond-doc-html ships translations as NAME.LANG.html next to the English NAME.html, and every manual twice:
    # split into pages and as one MANUAL-big-page.html (a near duplicate that exact dedup cannot catch).
    Source("lilypond-doc-html", "english", "usr/share/doc/lilypond/html/**/*.html", "html",
           exclude=r"(\.[a-z]{2}(_[A-Z]{2})?\.html$|-big-page)"),
    Source("linux-doc-6.1", "english", "usr/share/doc/linux-doc-6.1/html/_sources/**/*.rst.txt", "text"),
    Source("python3.11-doc", "english", "usr/share/doc/python3.11/html/_sources/**/*.rst.txt", "text"),
    Source("perl-doc", "english", "usr/share/doc/perl/**/*.pod*", "pod"),
    Source("perl-doc", "english", "usr/share/perl/**/*.pod", "pod"),
    Source("libreoffice-help-en-us", "english", "usr/share/libreoffice/help/en-US/**/*.html", "html"),
    Source("git-doc", "english", "usr/share/doc/git-doc/**/*.txt", "text"),
    Source("manpages", "english", "usr/share/man/**/*.gz", "roff"),
    Source("gimp-help-en", "english", "usr/share/gimp/2.0/help/en/**/*.html", "html"),
    Source("debian-handbook", "english", "usr/share/doc/debian-handbook/html/en-US/**/*.html", "html"),
    Source("debian-reference-en", "english", "usr/share/debian-reference/*.html", "html"),
    Source("gnome-user-docs", "english", "usr/share/help/C/**/*.page", "mallard"),
    # Japanese
    Source("lilypond-doc-html-ja", "japanese", "usr/share/doc/lilypond/html/**/*.ja.html", "html",
           exclude=r"-big-page"),
    Source("manpages-ja", "japanese", "usr/share/man/ja/**/*.gz", "roff"),
    Source("manpages-ja-dev", "japanese", "usr/share/man/ja/**/*.gz", "roff"),
    Source("libreoffice-help-ja", "japanese", "usr/share/libreoffice/help/ja/**/*.html", "html"),
    Source("gimp-help-ja", "japanese", "usr/share/gimp/2.0/help/ja/**/*.html", "html"),
    Source("groonga-doc", "japanese", "usr/share/doc/groonga-doc/ja/html/**/*.html", "html"),
    Source("debian-handbook", "japanese", "usr/share/doc/debian-handbook/html/ja-JP/**/*.html", "html"),
    Source("debian-reference-ja", "japanese", "usr/share/debian-reference/*.html", "html"),
    Source("installation-guide-amd64", "japanese", "usr/share/doc/installation-guide-amd64/ja/**/*.html", "html"),
    Source("maint-guide-ja", "japanese", "usr/share/doc/maint-guide-ja/**/*.html", "html"),
    # Code: the Python standard library with its test suite, from the Debian packages of the same release
    # (Debian puts the modules the interpreter needs at startup, os, re, codecs, ..., in -minimal).
    Source("libpython3.11-minimal", "code", "usr/lib/python3.11/**/*.py", "python"),
    Source("libpython3.11-stdlib", "code", "usr/lib/python3.11/**/*.py", "python"),
    Source("libpython3.11-testsuite", "code", "usr/lib/python3.11/**/*.py", "python"),
)


# ---------------------------------------------------------------------------------------------------------------------
# Text extraction, one pure function per input kind
# ---------------------------------------------------------------------------------------------------------------------

_BLOCK_TAGS = {
    "p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
    "section", "article", "blockquote", "title", "hr", "caption", "figure", "header", "footer",
    # Mallard (GNOME help)
    "page", "item", "list", "terms", "steps", "note", "screen", "example", "subtitle", "desc", "tree",
}
_SKIP_TAGS = {"script", "style", "head", "noscript", "svg", "info", "math"}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr", "source"}
_PRE_TAGS = {"pre", "screen"}  # <code> is inline in HTML and Mallard: keep it in the flow


class _TextExtractor(HTMLParser):
    """Visible text of an HTML / XML page: block tags become line breaks, whitespace collapses outside <pre>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in _VOID_TAGS:
            if tag in ("br", "hr"):
                self.parts.append("\n")
            return
        if tag in _SKIP_TAGS:
            self.skip_depth += 1
        if tag in _PRE_TAGS:
            self.pre_depth += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _VOID_TAGS:
            return
        if tag in _SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        if tag in _PRE_TAGS:
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip_depth:
            return
        self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))


def tidy(text: str) -> str:
    """Strip trailing spaces per line, drop leading spaces of prose lines, and keep at most one blank line in a row."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_to_text(markup: str) -> str:
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    lines = ("".join(parser.parts)).split("\n")
    # Outside <pre> every run of whitespace became one space, so a leading space is an artifact of the markup.
    return tidy("\n".join(line.strip() if not line.startswith("    ") else line for line in lines))


_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes \fB \fI \fR \fP \f(CW \f[B]
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),  # string registers
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((oq|cq|aq)"), "'"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(co"), "(c)"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other special characters
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[&|^/,%:)]"), ""),  # zero-width and italic-correction escapes
    (re.compile(r"\\ "), " "),
    (re.compile(r'\\".*$', re.M), ""),  # trailing comment
]
# Macros whose arguments are visible text (headings, font macros, list tags).
_ROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SM", "SB", "TP", "IP", "HP", "TQ",
                     "Nm", "Nd", "Sh", "Ss", "It", "Fn", "Fa", "Ft", "Ar", "Fl", "Op", "Pa", "Xr", "Dv", "Er", "Ev",
                     "Cm", "Em", "Sy", "Li", "Va", "Vt", "Ql", "Dq", "Sq", "Pq", "UR", "MT"}


def roff_to_text(source: str) -> str:
    """Readable text of a man page: drop comments and layout requests, keep the arguments of text macros."""
    out: list[str] = []
    for line in source.split("\n"):
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, args = line[1:].strip().partition(" ")
            if macro in ("SH", "SS", "Sh", "Ss"):
                out.append("")
            if macro in _ROFF_TEXT_MACROS and args:
                out.append(args.replace('"', ""))
            elif macro in ("PP", "LP", "P", "Pp", "sp", "br"):
                out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    for pattern, replacement in _ROFF_ESCAPES:
        text = pattern.sub(replacement, text)
    return tidy(text.replace("\\\\", "\\"))


def pod_to_text(source: str) -> str:
    """Readable text of Perl POD: keep headings and item text, unwrap B<> C<> I<> L<> F<> E<> codes."""
    out: list[str] = []
    for line in source.split("\n"):
        if line.startswith("="):
            command, _, args = line[1:].partition(" ")
            if command.startswith(("head", "item")) and args.strip():
                out.append(args.strip())
            continue
        out.append(line)
    text = "\n".join(out)
    entities = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}
    for _ in range(4):  # codes nest (B<C<x>>); unwrap innermost first
        text = re.sub(r"E<([^<>]*)>", lambda m: entities.get(m.group(1), html.unescape(f"&{m.group(1)};")), text)
        text = re.sub(r"L<(?:[^<>|]*\|)?([^<>]*)>", r"\1", text)
        text = re.sub(r"[BCIFSXZ]<<+ (.*?) >+>", r"\1", text)
        text = re.sub(r"[BCIFSXZ]<([^<>]*)>", r"\1", text)
    return tidy(text)


def gcide_documents(text: str, target_chars: int = 16_000) -> list[str]:
    """The GCIDE dictionary as documents of ~target_chars of consecutive entries (one entry alone is too short to
    teach anything; the whole 40 MB as one document would be one huge validation-or-train coin flip)."""
    text = re.sub(r"^\s*\[(1913 Webster|PJC|WordNet 1\.5|Century Dict\.)[^\]]*\]\s*$\n?", "", text, flags=re.M)
    entries = re.split(r"\n\n(?=\S)", text)
    documents, current, size = [], [], 0
    for entry in entries:
        if entry.startswith("00-database"):
            continue
        current.append(entry.strip("\n"))
        size += len(entry)
        if size >= target_chars:
            documents.append(tidy("\n\n".join(current)))
            current, size = [], 0
    if current:
        documents.append(tidy("\n\n".join(current)))
    return documents


def decode(raw: bytes, domain: str) -> str:
    """UTF-8, else EUC-JP for the Japanese domain (older manpages-ja files), else cp1252 with replacement."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if domain == "japanese":
        try:
            return raw.decode("euc_jp")
        except UnicodeDecodeError:
            pass
    return raw.decode("utf-8", errors="replace")


def extract_documents(path: Path, kind: str, domain: str) -> list[str]:
    """The plain-text documents in one file (one, except for the dictionary)."""
    raw = path.read_bytes()
    if path.suffix in (".gz", ".dz"):
        raw = gzip.decompress(raw)
    text = decode(raw, domain)
    if kind == "gcide":
        return gcide_documents(text)
    if kind in ("html", "mallard"):
        return [html_to_text(text)]
    if kind == "roff":
        if text.startswith(".so ") and len(text) < 200:  # a link to another page
            return []
        return [roff_to_text(text)]
    if kind == "pod":
        return [pod_to_text(text)]
    if kind in ("text", "python"):
        return [tidy(text)] if kind == "text" else [text]
    raise ValueError(f"unknown kind {kind}")


_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")


def japanese_fraction(text: str) -> float:
    """Share of characters in hiragana, katakana or CJK ideographs."""
    return len(_JAPANESE.findall(text)) / max(1, len(text))


def normalized_hash(text: str) -> str:
    """sha256 of the whitespace-normalized text: the identity used for duplicate removal and the split."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def is_validation(digest: str, val_fraction: float) -> bool:
    """The split as a function of content only: a document is held out iff its hash falls below val_fraction."""
    return int(digest[:15], 16) / 16**15 < val_fraction


# ---------------------------------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------------------------------


def fetch_package(package: str, cache: Path) -> dict:
    """Download (if needed) and extract one package; returns its manifest record."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", "-q", package], cwd=debs, check=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
    if len(found) != 1:
        raise SystemExit(f"expected one .deb for {package} in {debs}, found {[f.name for f in found]}")
    deb = found[0]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                             text=True).stdout.strip()
    digest = sha256_file(deb)
    root = cache / "extract" / package
    stamp = root / ".extracted"
    if not stamp.is_file() or stamp.read_text() != digest:
        subprocess.run(["rm", "-rf", str(root)], check=True)
        root.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        stamp.write_text(digest)
    return {"package": package, "version": version, "deb": deb.name, "sha256": digest, "root": root}


def collect(sources, packages: dict, *, min_chars: int, min_japanese: float, val_fraction: float, log=print):
    """Documents per (domain, split) in source-table order, deduplicated; plus per-source statistics."""
    seen: set[str] = set()
    splits = {(domain, split): [] for domain in DOMAINS for split in ("train", "val")}
    stats = []
    for source in sources:
        root = packages[source.package]["root"]
        files = sorted(p for p in root.glob(source.pattern) if p.is_file())
        if source.exclude:
            files = [p for p in files if not re.search(source.exclude, str(p.relative_to(root)))]
        kept = short = not_japanese = duplicates = chars = 0
        start = time.time()
        for path in files:
            for text in extract_documents(path, source.kind, source.domain):
                if len(text) < min_chars:
                    short += 1
                    continue
                if source.domain == "japanese" and japanese_fraction(text) < min_japanese:
                    not_japanese += 1
                    continue
                digest = normalized_hash(text)
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
                split = "val" if is_validation(digest, val_fraction) else "train"
                splits[source.domain, split].append(
                    {"text": text, "source": f"{source.package}:{path.relative_to(root)}", "hash": digest})
                kept += 1
                chars += len(text)
        stats.append({"package": source.package, "domain": source.domain, "pattern": source.pattern,
                      "files": len(files), "documents": kept, "characters": chars, "dropped_short": short,
                      "dropped_not_japanese": not_japanese, "dropped_duplicate": duplicates})
        log(f"  {source.domain:8s} {source.package:26s} {len(files):6d} files -> {kept:6d} docs "
            f"{chars / 1e6:7.1f} M chars  (short {short}, non-ja {not_japanese}, dup {duplicates}) "
            f"{time.time() - start:5.1f}s")
    return splits, stats


def write_jsonl_gz(path: Path, records) -> int:
    """Write {"text", "source"} records; returns the UTF-8 byte count of the texts. mtime=0: identical bytes per run."""
    text_bytes = 0
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as handle:
        for record in records:
            handle.write((json.dumps({"text": record["text"], "source": record["source"]}, ensure_ascii=False)
                          + "\n").encode())
            text_bytes += len(record["text"].encode())
    return text_bytes


def sample(records: list[dict], max_bytes: int) -> list[dict]:
    """Documents in hash order (a seedless, content-defined shuffle) until max_bytes of text; kept in corpus order."""
    chosen, total = [], 0
    for index in sorted(range(len(records)), key=lambda i: records[i]["hash"]):
        size = len(records[index]["text"].encode())
        if total + size > max_bytes:
            continue
        chosen.append(index)
        total += size
        if total > 0.98 * max_bytes:
            break
    return [records[i] for i in sorted(chosen)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the full corpus (not committed)")
    parser.add_argument("--cache", type=Path, default=Path("runs/corpus-cache"),
                        help="where .deb files are downloaded and extracted")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out per domain")
    parser.add_argument("--min-chars", type=int, default=200, help="drop documents shorter than this")
    parser.add_argument("--min-japanese", type=float, default=0.05,
                        help="drop Japanese-domain documents with a smaller share of Japanese script characters")
    parser.add_argument("--sample-out", type=Path, help="also write a small sample here (e.g. data/sample)")
    parser.add_argument("--sample-bytes", type=int, default=4_000_000,
                        help="UTF-8 text bytes per domain in the sample's train split (validation gets 1/20)")
    args = parser.parse_args(argv)

    start = time.time()
    packages = {}
    for package in sorted({s.package for s in SOURCES}):
        packages[package] = fetch_package(package, args.cache)
        print(f"package {package} {packages[package]['version']}", flush=True)
    print(f"fetched and extracted {len(packages)} packages in {time.time() - start:.0f}s", flush=True)

    splits, stats = collect(SOURCES, packages, min_chars=args.min_chars, min_japanese=args.min_japanese,
                            val_fraction=args.val_fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for (domain, split), records in splits.items():
        path = args.out / f"{domain}.{split}.jsonl.gz"
        text_bytes = write_jsonl_gz(path, records)
        summary[f"{domain}.{split}"] = {
            "file": path.name, "documents": len(records), "characters": sum(len(r["text"]) for r in records),
            "text_bytes": text_bytes, "gzip_bytes": path.stat().st_size,
        }
        if domain == "japanese":
            ja_chars = sum(len(_JAPANESE.findall(r["text"])) for r in records)
            summary[f"{domain}.{split}"]["japanese_script_share"] = round(ja_chars / max(1, sum(
                len(r["text"]) for r in records)), 4)
        print(f"{path.name}: {len(records)} docs, {text_bytes / 1e6:.1f} MB text, "
              f"{path.stat().st_size / 1e6:.1f} MB gzip", flush=True)

    manifest = {
        "packages": [{k: v for k, v in record.items() if k != "root"} for record in packages.values()],
        "sources": stats,
        "splits": summary,
        "settings": {"val_fraction": args.val_fraction, "min_chars": args.min_chars,
                     "min_japanese": args.min_japanese, "split_rule": "sha256(normalized text) < val_fraction"},
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")

    if args.sample_out:
        args.sample_out.mkdir(parents=True, exist_ok=True)
        sample_summary = {}
        for (domain, split), records in splits.items():
            budget = args.sample_bytes if split == "train" else args.sample_bytes // 20
            chosen = sample(records, budget)
            path = args.sample_out / f"{domain}.{split}.jsonl.gz"
            text_bytes = write_jsonl_gz(path, chosen)
            sample_summary[f"{domain}.{split}"] = {"documents": len(chosen), "text_bytes": text_bytes,
                                                   "gzip_bytes": path.stat().st_size}
            print(f"sample {path}: {len(chosen)} docs, {text_bytes / 1e6:.2f} MB text, "
                  f"{path.stat().st_size / 1e6:.2f} MB gzip", flush=True)
        (args.sample_out / "manifest.json").write_text(json.dumps(
            {"packages": manifest["packages"], "splits": sample_summary,
             "settings": {**manifest["settings"], "sample_bytes": args.sample_bytes,
                          "sample_rule": "documents in sha256 order until the byte budget; corpus order kept"}},
            indent=2, ensure_ascii=False) + "\n")
    print(f"done in {time.time() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
