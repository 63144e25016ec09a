"""Helpers shared by the tests (tests import them from here, never from conftest or from each other):

- tiny but real dense HF checkpoints, built with transformers and saved to disk, for every supported family;
- a tiny prepared data directory and a tiny training config, made on the spot so the trainer tests need no committed
  data and run in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.02)


def dense_config(family: str, *, tied: bool = False, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kwargs = {**TINY, "tie_word_embeddings": tied, "rope_parameters": {"rope_type": "default", "rope_theta": 5e4}}
    if family == "qwen3":
        kwargs["head_dim"] = 16  # differs from hidden / heads = 8, so a lost head_dim shows
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return cls(**kwargs)


def save_dense(directory: Path, family: str = "llama", *, tied: bool = False, dtype=torch.float32, seed: int = 0,
               max_shard_size: str | None = None, **overrides) -> Path:
    """Build a randomly initialised dense model (weights scaled up so the FFN matters) and save it as safetensors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(dense_config(family, tied=tied, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
            else:  # norms: not exactly one, so copying them wrongly shows
                p.uniform_(0.8, 1.2)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return Path(directory)


def write_tokenizer(directory: Path, *, eos: bool = False) -> None:
    """A tiny word-level tokenizer (words w0 .. w89 are ids 0 .. 89) so tokenizer files exist to be copied and used;
    with `eos`, "</s>" (id 91) is its EOS token, so `upcycle data prepare` and calibration can use it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(90)} | {"[UNK]": 90} | ({"</s>": 91} if eos else {})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"eos_token": "</s>"} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **extra).save_pretrained(directory)


def logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def read_config(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


def assert_export_round_trip(model, out: Path, ids: torch.Tensor, fmt: str = "auto") -> dict:
    """The one export round trip of our model: one AdamW step (so the exported weights are trained ones, not the
    converted ones), `export_hf` to `out`, then transformers' logits of the export equal our trained model's and
    `load_model` reads back the same config. Returns the exported config.json."""
    from upcycle.hf_model import export_hf, load_model

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    export_hf(model, model.config, out, fmt=fmt)
    with torch.no_grad():
        torch.testing.assert_close(logits(out, ids), model(ids).logits, atol=1e-5, rtol=0)
    assert load_model(out).config == model.config
    return read_config(out)


VOCAB = 64
EOS = VOCAB - 1
REPO = Path(__file__).resolve().parents[1]


def make_data_dir(root: Path, *, train_tokens: int = 12_000, val_tokens: int = 1_500, seed: int = 0) -> Path:
    """A prepared directory (the format data.prepare writes) with two domains of learnable token streams.

    Each domain follows its own noisy rule next = (a * token + b) mod (V - 1), with EOS every ~40 tokens, so the loss
    drops quickly and the two domains route differently.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    domains = {}
    for name, (a, b) in {"code": (3, 5), "english": (5, 11)}.items():
        entry = {}
        for split, count in (("train", train_tokens), ("val", val_tokens)):
            tokens = np.empty(count, dtype=np.uint16)
            token = int(rng.integers(VOCAB - 1))
            for i in range(count):
                if rng.random() < 0.025:
                    tokens[i] = EOS
                    token = int(rng.integers(VOCAB - 1))
                    continue
                noisy = rng.random() < 0.1
                token = int(rng.integers(VOCAB - 1)) if noisy else (a * token + b) % (VOCAB - 1)
                tokens[i] = token
            tokens[-1] = EOS
            file = f"{name}.{split}.bin"
            tokens.tofile(root / file)
            entry[split] = {"file": file, "tokens": count, "documents": int((tokens == EOS).sum())}
        entry["sources"] = []
        domains[name] = entry
    metadata = {"format": 1, "tokenizer": "synthetic", "tokenizer_sha256": None, "vocab_size": VOCAB, "eos_id": EOS,
                "dtype": "uint16", "val_fraction": 0.1, "seed": seed, "text_field": "text", "domains": domains}
    (root / "data.json").write_text(json.dumps(metadata))
    return root


def tiny_config(data_dir: Path, *, moe: bool = True, **sections) -> dict:
    """A 2-layer, dim-32 model with 4 experts (top-2) trained on 8 x 32-token sequences per step, in fp32 (exact
    comparisons; `precision: auto` would pick bf16 on a CPU with native bf16)."""
    config = {
        "model": {"vocab_size": VOCAB, "dim": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_dim": 48,
                  "max_seq_len": 64, "num_experts": 4 if moe else 0, "top_k": 2},
        "data": {"path": str(data_dir), "seq_len": 32},
        "optim": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"warmup_steps": 2},
        "train": {"max_steps": 8, "global_batch_tokens": 256, "micro_batch_size": 2, "eval_every": 4,
                  "eval_sequences": 4, "precision": "fp32"},
        "checkpoint": {"every": 4, "keep": 2},
        "logging": {"progress": False, "tensorboard": False},
    }
    for section, values in sections.items():
        if values is None:
            config.pop(section, None)
        else:
            config.setdefault(section, {}).update(values)
    return config


def write_config(path: Path, config: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]


def step_losses(out: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(out)]


def subprocess_env(threads: int = 1) -> dict:
    """The environment of a child training process: our sources importable, a fixed thread count (the reference
    run in the same test uses the same count, so floating-point reductions happen in the same order)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(config: Path, out: Path, *extra: str, nproc: int = 2, timeout: float = 300) -> str:
    """`torchrun --standalone --nproc_per_node=NPROC -m upcycle train ...` (one thread per rank); returns stderr."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "upcycle", "train", "--config", str(config), "--out", str(out), *extra]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def train_one_process(config: Path, out: Path) -> None:
    """`run_training` in this process with one torch thread: the reference that multi-rank runs (one thread per rank)
    are compared with."""
    from upcycle.train import run_training
    from upcycle.train_config import load_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(load_config(config), out)
    finally:
        torch.set_num_threads(threads)


def assert_same_training(got: Path, expected: Path, steps: range, *, total_steps: int, rel: float,
                         same_routing: bool = True) -> None:
    """Run `got` logged the same loss, CE, aux loss, gradient norm, learning rate and validation losses as `expected`
    (within `rel`) at `steps`, and the expert loads where `same_routing`; it logged every step 1..total_steps."""
    import pytest

    by_step = {r["step"]: r for r in read_metrics(got)}
    for record in read_metrics(expected):
        if record["step"] not in steps:
            continue
        other = by_step[record["step"]]
        for key in ("loss", "ce", "aux", "grad_norm"):
            assert other[key] == pytest.approx(record[key], rel=rel), (record["step"], key)
        assert other["lr"] == record["lr"]
        if same_routing:
            assert other.get("expert_load") == record.get("expert_load"), record["step"]
        for domain, value in record.get("val", {}).items():
            assert other["val"][domain] == pytest.approx(value, rel=rel), (record["step"], domain)
    assert sorted(by_step) == list(range(1, total_steps + 1))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """`upcycle ARGV` in this process, through the CLI's own `main`: (exit status, stderr). The one in-process runner
    of the tests (test_cli_errors runs the installed entry point once per command as a real subprocess)."""
    from upcycle.cli import main

    try:
        result = main(list(argv))
        code = 0 if result is None else result
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A refusal as every command gives it: exit status 2 and one line on stderr (no traceback) holding `needles`."""
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def assert_convert_refused(capsys, source: Path | str, output: Path, *flags: str, message: str) -> None:
    """`upcycle convert SOURCE OUTPUT FLAGS` is refused with one line holding `message`, and nothing is written
    beside OUTPUT (neither OUTPUT nor a temporary sibling)."""
    output = Path(output)
    before = sorted(output.parent.iterdir())
    code, err = run_cli(capsys, "convert", str(source), str(output), *flags, "--quiet")
    assert_one_line_error(code, err, message)
    assert sorted(output.parent.iterdir()) == before


def train_cli(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "upcycle", "train", "--config", str(config), "--out", str(out), *extra]


def run_train(config: Path, out: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(train_cli(config, out, *extra), env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


# ---- a tiny prepared data directory (three domains, a 300-id BPE) and a tiny MoE of ours: eval and analyze tests ----


EVAL_VOCAB = 320  # model vocabulary; the tokenizer below has at most 300 ids
EVAL_ENGLISH = ["The quick brown fox jumps over the lazy dog.", "Please read the manual carefully before using it.",
                "The router sends every token to two of its experts.", "Water boils at one hundred degrees Celsius."]
EVAL_JAPANESE = ["吾輩は猫である。名前はまだ無い。", "東京は日本の首都である。", "このコマンドはファイルを一覧表示します。",
                 "設定ファイルを編集してから、サービスを再起動してください。"]


def _stdlib_json_sources() -> list[str]:
    import json as json_module

    return [p.read_text(encoding="utf-8") for p in sorted(Path(json_module.__file__).parent.glob("*.py"))]


def _numbered_documents(sentences: list[str], count: int) -> list[str]:
    return [f"{i}: " + " ".join(sentences[(i + j) % len(sentences)] for j in range(1 + i % 4)) for i in range(count)]


def make_tokenizer(directory: Path) -> Path:
    """A 300-id byte-level BPE over the three domains, saved as an HF tokenizer directory (transformers loads it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(EVAL_ENGLISH + EVAL_JAPANESE + _stdlib_json_sources(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(directory)
    return directory


def make_prepared(root: Path) -> tuple[Path, Path]:
    """(prepared data dir with domains code/english/japanese, tokenizer dir)."""
    from upcycle.data import prepare

    tokenizer = make_tokenizer(root / "tokenizer")
    sources = {}
    documents = {"english": _numbered_documents(EVAL_ENGLISH, 60), "japanese": _numbered_documents(EVAL_JAPANESE, 60),
                 "code": _stdlib_json_sources()}
    for name, docs in documents.items():
        (root / name).mkdir()
        for i, text in enumerate(docs):
            (root / name / f"{i:03d}.txt").write_text(text, encoding="utf-8")
        sources[name] = [root / name]
    prepare(sources, root / "data", tokenizer, val_fraction=0.25, seed=0, progress=False)
    return root / "data", tokenizer


def tiny_moe(seed: int = 0, **overrides):
    """A randomly initialised 3-layer, 4-expert top-2 MoE of ours (upcycle.model.Transformer), in eval mode."""
    from upcycle.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    config = ModelConfig(**{"vocab_size": EVAL_VOCAB, "dim": 32, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                            "ffn_dim": 48, "max_seq_len": 128, "num_experts": 4, "top_k": 2, "init_std": 0.1,
                            **overrides})
    return Transformer(config).eval()


# ---- a tiny experiment: the dense seed above (save_dense + write_tokenizer) on make_data_dir's two domains ----------


def tiny_experiment(seed_model: Path, data_dir: Path, arms: list[dict] | None = None, **changes) -> dict:
    """An `upcycle experiment` config mapping that trains each arm for 4 steps of 256 tokens (fp32, exact), one seed,
    measured on 128 validation tokens per domain."""
    config = {
        "seed_model": str(seed_model), "seeds": [0],
        "data": {"path": str(data_dir), "seq_len": 32},
        "moe": {"num_experts": 4, "top_k": 2},
        "budgets": [4 * 256],
        "eval": {"points": 3, "tokens": 128, "bootstrap": 200},
        "arms": arms or [{"name": "naive", "kind": "naive"}],
        "recipe": {"optim": {"lr": 3e-3, "min_lr": 3e-4}, "schedule": {"warmup_steps": 1},
                   "train": {"global_batch_tokens": 256, "micro_batch_size": 8, "precision": "fp32"},
                   "logging": {"progress": False}},
    }
    config.update(changes)
    return config
