"""Fixtures shared by the tests; the helpers they use live in helpers.py.

tests/unit: one process, fast (`make test-unit`, the inner loop). tests/integration: tests that start processes
(torchrun ranks, spawned workers, the CLI end to end, the demo, the benchmarks); they carry the `integration` marker,
set here from their folder. `make test` runs both."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import save_dense, write_tokenizer


def pytest_collection_modifyitems(config, items):
    integration = Path(__file__).parent / "integration"
    for item in items:
        if integration in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine OpenMP's waiting for a descheduled
    thread made them ~10x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _session_probe_cache(tmp_path_factory):
    """`precision` probes (upcycle.hardware.probe) are cached in a directory of this test session, which the
    subprocesses tests start inherit, never in the user's cache: each width and thread count is measured at most once
    per session (again only if it was measured busy and the machine became quiet). Tests that inject timings point
    XDG_CACHE_HOME at their own directory."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


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
