"""Every bad input to `upcycle data prepare` gets one clear line, exit status 2, and nothing written.

Inputs live in IN/ (a good file `ok.jsonl`, plus whatever a case adds); the tokenizer is the committed one.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "assets" / "tokenizer"


def _write(name: str, content: str | bytes):
    def make(root: Path) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    return make


def _gzip(name: str, content: bytes, *, truncate: int = 0):
    def make(root: Path) -> None:
        data = gzip.compress(content)
        (root / name).write_bytes(data[:len(data) - truncate])
    return make


def _tokenizer_without_json(root: Path) -> None:
    (root / "tok").mkdir()
    shutil.copy2(TOKENIZER / "tokenizer_config.json", root / "tok" / "tokenizer_config.json")


OK = "e={in}/ok.jsonl"
# case: (make inputs under IN, argv after `data prepare`, part of the message)
CASES = {
    "empty jsonl file": (_write("empty.jsonl", ""), ["{out}", "{tok}", "--domain", "e={in}/empty.jsonl"],
                         "no non-empty documents"),
    "empty text file": (_write("empty.txt", ""), ["{out}", "{tok}", "--domain", "e={in}/empty.txt"],
                        "no non-empty documents"),
    "empty gzip file": (_gzip("empty.jsonl.gz", b""), ["{out}", "{tok}", "--domain", "e={in}/empty.jsonl.gz"],
                        "no non-empty documents"),
    "only empty documents": (_write("blank.jsonl", '{"text": ""}\n\n  \n'),
                             ["{out}", "{tok}", "--domain", "e={in}/blank.jsonl"], "no non-empty documents"),
    "line not JSON": (_write("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n'),
                      ["{out}", "{tok}", "--domain", "e={in}/bad.jsonl"], "bad.jsonl:2: not valid JSON"),
    "line is a JSON list": (_write("list.jsonl", '["a"]\n'), ["{out}", "{tok}", "--domain", "e={in}/list.jsonl"],
                            "list.jsonl:1: expected a JSON object"),
    "missing text field": (_write("nofield.jsonl", '{"content": "hello"}\n'),
                           ["{out}", "{tok}", "--domain", "e={in}/nofield.jsonl"], "with --text-field"),
    "text field not a string": (_write("num.jsonl", '{"text": 3}\n'),
                                ["{out}", "{tok}", "--domain", "e={in}/num.jsonl"], "string field 'text'"),
    "other text field absent": (None, ["{out}", "{tok}", "--domain", OK, "--text-field", "body"],
                                "string field 'body'"),
    "not UTF-8": (_write("latin1.txt", "caf\u00e9".encode("latin-1")),
                  ["{out}", "{tok}", "--domain", "e={in}/latin1.txt"], "not UTF-8"),
    "truncated gzip": (_gzip("cut.jsonl.gz", b'{"text": "hello"}\n' * 200, truncate=20),
                       ["{out}", "{tok}", "--domain", "e={in}/cut.jsonl.gz"], "cannot read"),
    "missing input": (None, ["{out}", "{tok}", "--domain", "e={in}/nowhere.jsonl"], "does not exist"),
    "lone surrogate escape": (_write("sur.jsonl", '{"text": "fine"}\n{"text": "half \\ud800 a pair"}\n'),
                              ["{out}", "{tok}", "--domain", "e={in}/sur.jsonl"],
                              "sur.jsonl:2: the text holds a lone surrogate escape (\\ud800)"),
    "/dev/null as input": (None, ["{out}", "{tok}", "--domain", "e=/dev/null"],
                           "input path /dev/null is a character device, not a file or a directory"),
    "a FIFO as input": (lambda root: os.mkfifo(root / "fifo"), ["{out}", "{tok}", "--domain", "e={in}/fifo"],
                        "is a FIFO, not a file or a directory"),
    "a symlink to itself as input": (lambda root: (root / "loop").symlink_to(root / "loop"),
                                     ["{out}", "{tok}", "--domain", "e={in}/loop"], "is a symlink loop"),
    "/dev/null as tokenizer": (None, ["{out}", "/dev/null", "--domain", OK], "tokenizer path /dev/null is a character"),
    "empty input directory": (lambda root: (root / "void").mkdir(), ["{out}", "{tok}", "--domain", "e={in}/void"],
                              "contains no (non-hidden) files"),
    "no domains": (None, ["{out}", "{tok}"], "no domains given"),
    "domain without paths": (None, ["{out}", "{tok}", "--domain", "english"], "is not NAME=PATH"),
    "domain name with a slash": (None, ["{out}", "{tok}", "--domain", "en/glish={in}/ok.jsonl"], "domain name"),
    "domain given twice": (_write("more.jsonl", '{"text": "more"}\n'),
                           ["{out}", "{tok}", "--domain", OK, "e={in}/more.jsonl"], "names domain 'e' twice"),
    "validation domain given twice": (_write("v.jsonl", '{"text": "v"}\n'),
                                      ["{out}", "{tok}", "--domain", OK, "--val-domain", "e={in}/v.jsonl",
                                       "e={in}/v.jsonl"], "--val-domain names domain 'e' twice"),
    "file given twice in a domain": (None, ["{out}", "{tok}", "--domain", "e={in}/ok.jsonl,{in}/ok.jsonl"],
                                     "is given twice"),
    "file given to two domains": (None, ["{out}", "{tok}", "--domain", OK, "f={in}/ok.jsonl"], "is given twice"),
    "training file also validation": (None, ["{out}", "{tok}", "--domain", OK, "--val-domain", OK],
                                      "is given twice (as training input of domain 'e' and as validation input"),
    "validation domain without training": (_write("v.jsonl", '{"text": "v"}\n'),
                                           ["{out}", "{tok}", "--domain", OK, "--val-domain", "x={in}/v.jsonl"],
                                           "have no training sources"),
    "val fraction 1": (None, ["{out}", "{tok}", "--domain", OK, "--val-fraction", "1"], "val_fraction must be in"),
    "val fraction NaN": (None, ["{out}", "{tok}", "--domain", OK, "--val-fraction", "nan"],
                         "--val-fraction must be a finite number, got nan"),
    "missing tokenizer": (None, ["{out}", "{in}/no-tokenizer", "--domain", OK], "tokenizer path"),
    "tokenizer dir without tokenizer.json": (_tokenizer_without_json, ["{out}", "{in}/tok", "--domain", OK],
                                             "no tokenizer.json in"),
    "tokenizer.json not a tokenizer": (_write("badtok/tokenizer.json", "{oops"),
                                       ["{out}", "{in}/badtok", "--domain", OK], "cannot load tokenizer"),
    "EOS token not in the vocabulary": (None, ["{out}", "{tok}", "--domain", OK, "--eos-token", "<nope>"],
                                        "pass --eos-token"),
    "output is the input directory": (None, ["{in}", "{tok}", "--domain", "e={in}", "--force"], "contains the input"),
    "output inside an input directory": (None, ["{in}/out", "{tok}", "--domain", "e={in}"],
                                         "lies inside the input directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    make, argv, message = CASES[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "ok.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    if make is not None:
        make(inputs)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    args = [a.format(out=out, tok=TOKENIZER, **{"in": inputs}) for a in argv]
    assert_one_line_error(*run_cli(capsys, "data", "prepare", *args), message)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, nothing left


def test_existing_output_is_refused_without_force_and_left_untouched(tmp_path, capsys):
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, err = run_cli(capsys, "data", "prepare", str(out), str(TOKENIZER), "--domain", f"e={tmp_path / 'ok.jsonl'}")
    assert_one_line_error(code, err, "pass --force")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
