"""Peak memory of `upcycle data prepare` on parquet files of growing size: bounded (record batches), not the file.

    python benchmarks/parquet_memory.py                  # 64 MB and 512 MB of text, a few minutes on 2 cores
    python benchmarks/parquet_memory.py --mb 32 128      # other sizes

For each size it writes a parquet file of that much UTF-8 text (documents of 200-20,000 characters drawn from a fixed
word list, 256 rows (about 2.5 MB of text) per row group, snappy-compressed as the Hub's files are), runs
`upcycle data prepare` on it in a child process with the committed tokenizer, and reports the child's peak resident
memory (the kernel's high-water mark, VmHWM) beside the text size; then the same for only reading the documents
(`iter_documents`), and for loading the file whole with pyarrow (`read_table`, what a non-streaming reader does). The
ratio of the peaks across sizes is the point: the streaming paths stay flat while the whole-file load grows with the
file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from upcycle.hardware import cpu_description  # noqa: E402

WORDS = ("the of and to in is that for it as with was on be by this are from or an at which not have but all were "
         "expert router token model layer dense sparse mixture training loss gradient weight upcycling drop").split()


def write_corpus(path: Path, megabytes: int) -> int:
    """A parquet file holding about `megabytes` MB of text; returns its exact number of characters."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    target, total = megabytes * 2**20, 0
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())]), compression="snappy") as writer:
        while total < target:
            rows = []
            for _ in range(256):
                words = rng.choice(WORDS, size=int(rng.integers(40, 4000)))
                rows.append(" ".join(words))
            total += sum(len(r) for r in rows)
            writer.write_table(pa.table({"text": rows}), row_group_size=256)
    return total


def peak_rss_mb(argv: list[str]) -> tuple[float, float]:
    """(peak resident MB of the child, its seconds)."""
    started = time.monotonic()
    child = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    peak = 0
    status = Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.05)
    if child.returncode != 0:
        raise RuntimeError(child.stderr.read()[-2000:])
    return peak / 1024, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[64, 512], help="text sizes in MB")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}; {os.cpu_count()} cores")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.mb:
            corpus = Path(tmp) / f"corpus-{size}.parquet"
            chars = write_corpus(corpus, size)
            read = [sys.executable, "-c", "import sys; from pathlib import Path; "
                    "from upcycle.data.prepare import iter_documents;"
                    " print(sum(len(t) for t in iter_documents(Path(sys.argv[1]))))", str(corpus)]
            whole = [sys.executable, "-c", "import sys, pyarrow.parquet as pq; t = pq.read_table(sys.argv[1]);"
                     " print(sum(len(s) for s in t.column('text').to_pylist()))", str(corpus)]
            prepare = [sys.executable, "-m", "upcycle", "data", "prepare", str(Path(tmp) / f"out-{size}"),
                       str(ROOT / "assets" / "tokenizer"), "--domain", f"text={corpus}"]
            row = {"text_mb": round(chars / 2**20, 1), "file_mb": round(corpus.stat().st_size / 2**20, 1)}
            for name, argv in (("read", read), ("read_whole", whole), ("prepare", prepare)):
                peak, seconds = peak_rss_mb(argv)
                row[f"{name}_peak_mb"], row[f"{name}_s"] = round(peak), round(seconds, 1)
            print(json.dumps(row), flush=True)
            results.append(row)
            corpus.unlink()
    if len(results) > 1:
        first, last = results[0], results[-1]
        grow = last["text_mb"] / first["text_mb"]
        print(f"text {grow:.1f}x larger: prepare peak {last['prepare_peak_mb'] / first['prepare_peak_mb']:.2f}x, "
              f"streamed read {last['read_peak_mb'] / first['read_peak_mb']:.2f}x, whole-file load "
              f"{last['read_whole_peak_mb'] / first['read_whole_peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
