"""Tiny but real dense checkpoints, built with transformers and saved to disk, for every supported family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def write_tokenizer(directory: Path) -> None:
    """A tiny word-level tokenizer so tokenizer files exist to be copied and used."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(90)} | {"[UNK]": 90}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)


def logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def read_config(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine OpenMP's waiting for a descheduled
    thread made them ~10x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    directory = save_dense(tmp_path_factory.mktemp("llama"), "llama")
    write_tokenizer(directory)
    return directory
