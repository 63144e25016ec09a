"""The package's layers import downward only: the on-disk formats and the math below the model, the model below the
trainer, the trainer below the experiment; a conversion never needs the trainer, and `upcycle --help` needs neither
torch nor transformers. Checked on what Python really imports (`-X importtime` in a fresh process) and on the import
statements themselves (every module of the package, however deep its folders, function bodies included)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, subprocess_env

PACKAGE = REPO / "src" / "upcycle"

# The trainer: what a conversion, an export, an evaluation or an analysis must never load.
TRAINER = ("upcycle.train.trainer", "upcycle.train.distributed", "upcycle.train.expert_parallel",
           "upcycle.train.checkpoint", "upcycle.train.shards", "upcycle.train.plan", "upcycle.train.metrics",
           "upcycle.experiment.runner", "upcycle.experiment.config", "upcycle.experiment.report",
           "torch.distributed.checkpoint")
# Modules below the trainer, each imported alone in a fresh process.
BELOW_THE_TRAINER = ("upcycle.convert.conversion", "upcycle.convert.compose", "upcycle.convert.grow",
                     "upcycle.convert.check", "upcycle.convert.calibration", "upcycle.model.hf",
                     "upcycle.eval.evaluate", "upcycle.eval.analyze", "upcycle.formats.training_checkpoint")


def imported_modules(*args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """Every module a fresh `python -X importtime ARGS` imports, and the finished process."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], env=subprocess_env(), capture_output=True,
                          text=True, cwd=REPO)
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
               if line.startswith("import time:") and line.count("|") == 2}
    modules.discard("imported package")
    return modules, done


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """The modules of `modules` that are one of `names` or inside one of them."""
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


@pytest.mark.parametrize("module", BELOW_THE_TRAINER)
def test_conversion_export_and_evaluation_load_no_trainer_module(module):
    modules, done = imported_modules("-c", f"import {module}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert module in modules
    assert loaded(modules, TRAINER) == [], f"import {module} loads the trainer"


def _subcommand_parser(words: list[str]):
    """The in-process argparse parser of `upcycle WORDS`."""
    import argparse

    from upcycle.cli import build_parser

    parser = build_parser()
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


COMMANDS = [[], ["convert"], ["compose"], ["check"], ["grow"], ["train"], ["plan"], ["export"], ["data"],
            ["data", "prepare"], ["eval"], ["analyze"], ["experiment"]]
EPILOGS = {"train": "config fields (override any with --section.field VALUE",
           "plan": "config fields (override any with --section.field VALUE",
           "experiment": "experiment config (YAML; docs/experiments.md has every field"}


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(["upcycle", *words, "--help"]))
def test_help_imports_neither_torch_nor_transformers(words):
    modules, done = imported_modules("-m", "upcycle", *words, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert loaded(modules, ("torch", "transformers")) == [], "help imports torch or transformers"
    # and it is the whole help: every flag of the command, and the config's fields where it lists them
    flags = {s for a in _subcommand_parser(words)._actions for s in a.option_strings if s.startswith("--")}
    assert flags and all(flag in done.stdout for flag in flags), sorted(f for f in flags if f not in done.stdout)
    if words and words[0] in EPILOGS:
        assert EPILOGS[words[0]] in done.stdout


def test_the_version_needs_no_torch_either():
    modules, done = imported_modules("-m", "upcycle", "--version")
    assert done.returncode == 0 and done.stdout.startswith("upcycle ")
    assert loaded(modules, ("torch", "transformers")) == []


def test_the_training_config_and_the_conversion_options_are_declared_without_torch():
    """What the CLI's help reads: the config dataclasses and the options of convert and grow."""
    modules, done = imported_modules("-c", "import upcycle.train.config, upcycle.experiment.config, "
                                           "upcycle.convert.options, upcycle.model.config, upcycle.commands")
    assert done.returncode == 0, done.stderr[-2000:]
    assert loaded(modules, ("torch", "transformers")) == []


# -- the tensor-source protocol ----------------------------------------------------------------------------------------


def test_every_lazy_tensor_mapping_is_a_tensor_source():
    from upcycle.formats.training_checkpoint import CheckpointTensors
    from upcycle.convert.conversion import LazyConversion
    from upcycle.model.hf import _SourceTensors
    from upcycle.formats.safetensors_io import CheckpointReader
    from upcycle.formats.tensor_sources import TensorSource

    for cls in (CheckpointReader, CheckpointTensors, LazyConversion, _SourceTensors):
        assert issubclass(cls, TensorSource), cls
    assert not isinstance({}, TensorSource)  # a plain dict of tensors has no shape(name)


def test_lazy_conversion_and_hf_tensors_answer_shapes_as_tensor_sources(tmp_path):
    from helpers import save_dense
    from upcycle.convert.conversion import lazy_convert
    from upcycle.model.hf import model_tensors
    from upcycle.formats.tensor_sources import TensorSource

    dense = save_dense(tmp_path / "dense")
    _, lazy = lazy_convert(dense, method="naive", num_experts=2, top_k=1)
    _, ours = model_tensors(dense)
    for tensors in (lazy, ours):
        assert isinstance(tensors, TensorSource)
        name = next(iter(tensors))
        assert name in tensors and "no such tensor" not in tensors and len(tensors) == len(list(tensors))
        assert tuple(tensors[name].shape) == tuple(tensors.shape(name))


# -- reading a sharded checkpoint from its headers ---------------------------------------------------------------------


def _sharded_checkpoint(path):
    """A sharded checkpoint as two ranks write it: "model/w" [4, 3] split by rows over both files, "model/b" and an
    optimizer tensor in the first only; with the small files and checksums every reader verifies."""
    from upcycle.formats.training_checkpoint import SHARDING_INFO_KEY, STATE_DIR
    from upcycle.formats.safetensors_io import save_tensors
    from upcycle.train.checkpoint import capture_rng_state

    state = path / STATE_DIR
    state.mkdir(parents=True)
    w = torch.arange(12, dtype=torch.bfloat16).reshape(4, 3)
    b = torch.tensor([1.0, 2.0, 3.0])
    parts = [{"model/w": (w[:2], [0, 0]), "model/b": (b, [0]), "optim/w/exp_avg": (w[:2].float(), [0, 0])},
             {"model/w": (w[2:], [2, 0]), "optim/w/exp_avg": (w[2:].float(), [2, 0])}]
    sums = {}
    for rank, part in enumerate(parts):
        info = json.dumps({key: {"saved_offsets": offsets} for key, (_, offsets) in part.items()})
        name = f"shard-0000{rank + 1}-model-00001-of-00001.safetensors"
        sums[name] = save_tensors(state / name, {key: tensor.contiguous() for key, (tensor, _) in part.items()},
                                  {SHARDING_INFO_KEY: info})
        (path / f"rng_rank{rank}.json").write_text(json.dumps(capture_rng_state()))
    files = {"config.json": {"format": "upcycle", "model": {}}, "optimizer.json": {"param_groups": []},
             "trainer_state.json": {"step": 0, "world_size": 2}, "checksums.json": sums}
    for name, value in files.items():
        (path / name).write_text(json.dumps(value))
    return {"w": w, "b": b}


def test_sharded_checkpoints_are_read_from_their_headers_as_torch_distributed_checkpoint_reads_them(tmp_path):
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from upcycle.formats.training_checkpoint import MODEL_PREFIX, STATE_DIR, CheckpointTensors

    expected = _sharded_checkpoint(tmp_path)
    tensors = CheckpointTensors(tmp_path)
    assert sorted(tensors) == ["b", "w"]
    metadata = HuggingFaceStorageReader(str(tmp_path / STATE_DIR)).read_metadata().state_dict_metadata
    for name, value in expected.items():
        assert tensors.shape(name) == tuple(metadata[MODEL_PREFIX + name].size) == tuple(value.shape)
        assert tensors[name].dtype == metadata[MODEL_PREFIX + name].properties.dtype == value.dtype
        assert torch.equal(tensors[name], value)


def test_the_sharding_metadata_names_are_torch_distributed_checkpoints():
    from torch.distributed.checkpoint import _hf_utils

    from upcycle.formats.training_checkpoint import SAVED_OFFSETS_KEY, SHARDING_INFO_KEY

    assert (SHARDING_INFO_KEY, SAVED_OFFSETS_KEY) == (_hf_utils.CUSTOM_METADATA_KEY, _hf_utils.SAVED_OFFSETS_KEY)


# -- the import graph --------------------------------------------------------------------------------------------------


def package_modules() -> dict[str, object]:
    """Every module of the package by dotted name (upcycle.x, upcycle.sub.y; a package by its __init__), found by
    walking its folders, so modules moved into subpackages stay checked."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports: every `import upcycle.x` / `from upcycle(.x) import ...` /
    relative import anywhere in it, function bodies included (a function-level import hides a dependency from Python,
    not from the design). `from upcycle.pkg import name` depends on upcycle.pkg.name when that is a module, else on
    upcycle.pkg."""
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # upcycle.x.attr -> upcycle.x; torch.nn -> ""
                    target = target.rpartition(".")[0]
                if target:
                    deps.add(target)
        graph[name] = deps - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle of `graph`: its strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) >= 35 and {"upcycle", "upcycle.cli", "upcycle.convert.conversion"} <= set(graph)
    assert import_cycles(graph) == []


def test_the_cycle_guard_sees_modules_in_subpackages_and_their_cycles():
    graph = {"upcycle.a": {"upcycle.sub.b"}, "upcycle.sub.b": {"upcycle.sub.c"}, "upcycle.sub.c": {"upcycle.a"},
             "upcycle.d": set()}
    assert import_cycles(graph) == [["upcycle.a", "upcycle.sub.b", "upcycle.sub.c"]]


def test_below_the_trainer_nothing_imports_the_trainer_even_inside_a_function():
    graph = import_graph()
    reached: set[str] = set()
    todo = [m for m in BELOW_THE_TRAINER if m in graph]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    assert loaded(reached, TRAINER) == []


# Every module's layer, top to bottom (docs/architecture.md draws the same table): a package puts all its modules in
# its layer, a module named on its own overrides its package's. A module may import its own layer and below.
LAYERS = {
    "command line": ("cli", "commands", "__main__"),
    "experiment": ("experiment",),
    "trainer": ("train",),
    "conversion, evaluation": ("convert", "eval"),
    "model": ("model",),
    "formats, data, upcycling math": ("formats", "data", "convert.upcycling", "convert.options"),
    "everywhere": ("errors", "files", "validation", "hardware", "config"),
}


def layer_depth(module: str) -> int | None:
    """How deep `module` (upcycle.x.y) sits in LAYERS (0 on top, more negative below), by its most specific entry."""
    name = module.removeprefix("upcycle.")
    depth = {entry: -level for level, entries in enumerate(LAYERS.values()) for entry in entries}
    while name:
        if name in depth:
            return depth[name]
        name = name.rpartition(".")[0]
    return None


def test_modules_import_downward_only():
    graph = import_graph()
    packages = {name for name, path in package_modules().items() if path.name == "__init__.py"}
    modules = [name for name in graph if name not in packages]
    unplaced = sorted(name for name in modules if layer_depth(name) is None)
    assert unplaced == [], "give these modules a layer in LAYERS (and docs/architecture.md)"
    upward = sorted((m, d) for m in modules for d in graph[m] if d not in packages and layer_depth(d) > layer_depth(m))
    assert upward == []
