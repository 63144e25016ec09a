"""Fixtures shared by the tests; the helpers they use live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import save_dense, write_tokenizer


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
