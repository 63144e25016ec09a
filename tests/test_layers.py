"""Reading weights without the trainer: every lazy mapping of tensors is a TensorSource, and our sharded training
checkpoints are read from their safetensors headers as torch.distributed.checkpoint reads them."""

from __future__ import annotations

import json

import torch


# -- the tensor-source protocol ----------------------------------------------------------------------------------------


def test_every_lazy_tensor_mapping_is_a_tensor_source():
    from upcycle.checkpoint_format import CheckpointTensors
    from upcycle.convert import LazyConversion
    from upcycle.hf_model import _SourceTensors
    from upcycle.safetensors_io import CheckpointReader
    from upcycle.tensor_sources import TensorSource

    for cls in (CheckpointReader, CheckpointTensors, LazyConversion, _SourceTensors):
        assert issubclass(cls, TensorSource), cls
    assert not isinstance({}, TensorSource)  # a plain dict of tensors has no shape(name)


def test_lazy_conversion_and_hf_tensors_answer_shapes_as_tensor_sources(tmp_path):
    from helpers import save_dense
    from upcycle.convert import lazy_convert
    from upcycle.hf_model import model_tensors
    from upcycle.tensor_sources import TensorSource

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
    optimizer tensor in the first only."""
    from upcycle.checkpoint_format import SHARDING_INFO_KEY, STATE_DIR
    from upcycle.safetensors_io import save_tensors

    state = path / STATE_DIR
    state.mkdir(parents=True)
    w = torch.arange(12, dtype=torch.bfloat16).reshape(4, 3)
    b = torch.tensor([1.0, 2.0, 3.0])
    parts = [{"model/w": (w[:2], [0, 0]), "model/b": (b, [0]), "optim/w/exp_avg": (w[:2].float(), [0, 0])},
             {"model/w": (w[2:], [2, 0]), "optim/w/exp_avg": (w[2:].float(), [2, 0])}]
    for rank, part in enumerate(parts):
        info = json.dumps({key: {"saved_offsets": offsets} for key, (_, offsets) in part.items()})
        save_tensors(state / f"shard-0000{rank + 1}-model-00001-of-00001.safetensors",
                     {key: tensor.contiguous() for key, (tensor, _) in part.items()}, {SHARDING_INFO_KEY: info})
    (path / "config.json").write_text(json.dumps({"format": "upcycle", "model": {}}))
    return {"w": w, "b": b}


def test_sharded_checkpoints_are_read_from_their_headers_as_torch_distributed_checkpoint_reads_them(tmp_path):
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from upcycle.checkpoint_format import MODEL_PREFIX, STATE_DIR, CheckpointTensors

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

    from upcycle.checkpoint_format import SAVED_OFFSETS_KEY, SHARDING_INFO_KEY

    assert (SHARDING_INFO_KEY, SAVED_OFFSETS_KEY) == (_hf_utils.CUSTOM_METADATA_KEY, _hf_utils.SAVED_OFFSETS_KEY)
