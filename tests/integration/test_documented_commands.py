"""Every `upcycle train` / torchrun command shown in README.md and docs/training.md runs as written, on the committed
sample data, with only the step budget shortened (and --out moved to a temporary directory). The placeholders CFG and
DIR stand for a shipped config and a run directory."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from helpers import REPO, read_metrics, subprocess_env

DOCS = ("README.md", "docs/training.md")
PLACEHOLDERS = {"CFG": "configs/tiny-moe.yaml"}


def documented_train_commands(multi_node: bool = False) -> list[tuple[str, str]]:
    """(doc, command line) for every line of a fenced code block that runs the trainer (a line ending in a backslash
    continues on the next). Multi-node launches (`--nnodes`) are listed only with multi_node=True: they need several
    machines, and test_expert_parallel runs them as single-rank "nodes" on this one."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```[^\n]*\n(.*?)```", (REPO / doc).read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                command = line.split("#", 1)[0].strip()
                words = shlex.split(command)
                if words and (words[0].endswith("upcycle") and words[1:2] == ["train"]
                              or words[0] == "torchrun" and "upcycle" in words and "train" in words):
                    command = re.sub(r"^\S*/upcycle ", "upcycle ", command)  # .venv/bin/upcycle: the same command
                    if any(w == "--nnodes" or w.startswith("--nnodes=") for w in words) != multi_node:
                        continue
                    if command not in [c for _, c in found]:
                        found.append((doc, command))
    return found


COMMANDS = documented_train_commands()


def _argv(command: str, out) -> list[str]:
    words = [PLACEHOLDERS.get(w, w) for w in shlex.split(command)]
    words[words.index("--out") + 1] = str(out)
    if words[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *words[1:]]  # a free port
    else:
        argv = [sys.executable, "-m", "upcycle", *words[1:]]
    # later flags win: --max-steps (the shortcut) over any --train.max_steps or --max-steps already given
    return argv + ["--max-steps", "2", "--logging.progress", "false", "--logging.tensorboard", "false"]


def test_the_docs_show_single_and_two_rank_commands():
    assert any(c.startswith("torchrun --nproc_per_node=2") for _, c in COMMANDS)
    assert sum(not c.startswith("torchrun") for _, c in COMMANDS) >= 3


@pytest.mark.parametrize("doc, command", [pytest.param(d, c, id=f"{d}: {c}", marks=[pytest.mark.slow]
                                                       if c.startswith("torchrun") else [])
                                          for d, c in COMMANDS])
def test_documented_train_command_runs(tmp_path, doc, command):
    out = tmp_path / "run"
    result = subprocess.run(_argv(command, out), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{doc}: {command}\n{result.stderr[-3000:]}"
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
