"""The CUDA/NCCL path's breaks and slow paths, each shown on the CPU where its mechanism can be: collectives on CPU
tensors go to a CPU (gloo) group, async staging keeps the state on the host, FSDP2 keeps no unsharded gradient across
micro-batches, grouped_mm is chosen only where it is one kernel (test_moe), DDP checkpoints carry bare names
(test_distributed), a failed checkpoint write fails every rank together, and the choices made by device capability."""

from __future__ import annotations

import errno
import threading

import pytest
import torch
import torch.distributed as dist

from upcycle.train import checkpoint as ckpt
from upcycle.train.distributed import (World, cuda_device_index, gloo_interface_problem, gradient_sync,
                                 process_group_backend)
from upcycle.errors import UpcycleError
from upcycle.train.expert_parallel import regroup_order
from upcycle.files import wait_for_file
from upcycle.hardware import cuda_precision, host_threads
from upcycle.train.losses import count_ids
from upcycle.model.transformer import ModelConfig, Transformer
from upcycle.train.trainer import layout_warnings, set_tf32
from upcycle.train.config import TrainLoopConfig

CONFIG = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48, num_experts=4, top_k=2,
              max_seq_len=16)


def cpu_world(rank: int = 0, world_size: int = 2, **kw) -> World:
    return World(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"), **kw)


# ---------------------------------------------------------------------------------------------------------------------
# B1: collectives on CPU tensors never reach an NCCL-only group


def test_the_default_group_serves_cpu_tensors_beside_nccl():
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"


def test_checkpoint_verification_reduces_on_the_host_group(tmp_path, monkeypatch):
    checkpointer = ckpt.Checkpointer(tmp_path / "checkpoints", cpu_world(world_size=1), keep=2)
    model = Transformer(ModelConfig(**CONFIG))
    optimizer = torch.optim.AdamW(model.parameters())
    path = checkpointer.save(1, model=model, optimizer=optimizer, model_config={}, trainer_state={},
                             train_config={})
    host_group = object()  # stands for the world's gloo group
    seen = []

    def nccl_like_all_reduce(tensor, op=None, group=None, async_op=False):
        # an NCCL default group has no backend for CPU tensors (torch's distributed_c10d refuses them)
        if group is None and tensor.device.type == "cpu":
            raise RuntimeError("No backend type associated with device type cpu")
        seen.append((group, tensor.device.type))

    monkeypatch.setattr(dist, "all_reduce", nccl_like_all_reduce)
    ckpt.verify_checksums(path, cpu_world(world_size=2, host_group=host_group))
    assert seen == [(host_group, "cpu")]


# ---------------------------------------------------------------------------------------------------------------------
# B2: the async save's staged copy stays on the host


@pytest.fixture
def fake_two_ranks():
    """A process group of two fake ranks (no communication), enough to describe GPU meshes without a GPU."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_staged_dtensor_stays_on_the_host_with_its_placement(fake_two_ranks):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    mesh = DeviceMesh("cuda", [0, 1])  # a GPU mesh, as FSDP2 builds on CUDA
    local = torch.randn(2, 3)
    spec = DTensorSpec(mesh, (Shard(0),), TensorMeta(torch.Size((4, 3)), (3, 1), torch.float32))
    live = DTensor(local, spec, requires_grad=False)
    staged = ckpt._staged_copy(live)  # DTensor.from_local would move it back to the mesh's device (here: fail)
    assert isinstance(staged, DTensor)
    assert staged.to_local().device.type == "cpu"
    assert staged.to_local().data_ptr() != local.data_ptr()
    assert staged.placements == live.placements and staged.device_mesh is mesh and staged.shape == live.shape
    torch.testing.assert_close(staged.to_local(), local)
    buffer = torch.empty(2, 3)  # the reused (pinned, on a GPU machine) staging buffer
    assert ckpt._staged_copy(live, buffer).to_local().data_ptr() == buffer.data_ptr()


# ---------------------------------------------------------------------------------------------------------------------
# B3: no unsharded fp32 gradient kept across the micro-batches of one step


def _fsdp_params(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    params = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            params += group.fsdp_params if group is not None else []
    return params


def test_fsdp_reduces_each_micro_batch_and_holds_no_unsharded_gradient(tmp_path):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**CONFIG))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        ids = torch.randint(CONFIG["vocab_size"], (2, 9))
        with gradient_sync(model, False):  # not the last micro-batch of the step
            model(ids[:, :-1]).logits.float().square().mean().backward()
        params = _fsdp_params(model)
        # FSDP2 keeps a skipped reduction's gradient unsharded: on the unsharded parameter, or upcast to the reduce
        # dtype under a mixed-precision policy
        held = [p for p in params if p.unsharded_accumulated_grad is not None
                or (hasattr(p, "_unsharded_param") and p._unsharded_param.grad is not None)]
        assert params and held == []
        assert all(p.grad is not None for p in model.parameters())  # the sharded gradients accumulate instead
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Slow paths: host synchronizations removed, choices by device capability


def test_expert_counts_need_no_host_read_and_equal_bincount():
    ids = torch.randint(6, (50, 2), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(count_ids(ids, 8), torch.bincount(ids.reshape(-1), minlength=8))


def test_regroup_order_with_the_known_row_count_is_the_same_permutation():
    counts = torch.tensor([[2, 0, 3], [1, 4, 0]])
    torch.testing.assert_close(regroup_order(counts, rows=10), regroup_order(counts))


def test_cuda_precision_follows_the_compute_capability():
    assert cuda_precision("auto", (9, 0)).precision == "bf16"
    assert cuda_precision("auto", (8, 0)).precision == "bf16"
    assert cuda_precision("auto", (7, 0)).precision == "fp32"  # V100: bf16 emulated
    assert cuda_precision("auto", (7, 5)).precision == "fp32"  # T4
    assert cuda_precision("bf16", (7, 5)).warning
    assert cuda_precision("auto", None).precision == "bf16"  # planning from a machine without a GPU


def test_tf32_is_for_fp32_on_cuda_only():
    loop = TrainLoopConfig(precision="fp32")
    assert set_tf32(loop, torch.device("cpu"), print) is False
    assert not torch.backends.cuda.matmul.allow_tf32


def test_cuda_device_index_takes_the_only_visible_gpu():
    assert cuda_device_index(3, 8) == 3
    assert cuda_device_index(3, 1) == 0  # SLURM: one GPU per task through CUDA_VISIBLE_DEVICES
    with pytest.raises(UpcycleError, match="LOCAL_RANK 5 has no GPU"):
        cuda_device_index(5, 4)


def test_gloo_on_a_host_name_that_resolves_to_loopback_is_refused_across_nodes():
    problem = gloo_interface_problem(multi_node=True, host_address="127.0.1.1", master_address="10.0.0.5", env={})
    assert problem and "GLOO_SOCKET_IFNAME" in problem
    assert gloo_interface_problem(multi_node=True, host_address="127.0.1.1", master_address="10.0.0.5",
                                  env={"GLOO_SOCKET_IFNAME": "eth0"}) is None
    assert gloo_interface_problem(multi_node=True, host_address="10.0.0.6", master_address="10.0.0.5", env={}) is None
    assert gloo_interface_problem(multi_node=False, host_address="127.0.0.1", master_address=None, env={}) is None
    # every "node" on this machine (the test suite's two-node launch): loopback reaches them all
    assert gloo_interface_problem(multi_node=True, host_address="127.0.0.1", master_address="127.0.0.1",
                                  env={}) is None


def test_layouts_that_cross_nodes_are_warned_about():
    world = World(rank=0, world_size=16, local_rank=0, device=torch.device("cpu"), local_world_size=8)
    [expert] = layout_warnings(TrainLoopConfig(expert_parallel=16, data_parallel_replicate=2), world)
    assert "more than the 8 ranks of a node" in expert
    [fsdp] = layout_warnings(TrainLoopConfig(), world)
    assert "data_parallel_replicate: 2" in fsdp
    assert layout_warnings(TrainLoopConfig(expert_parallel=8, data_parallel_replicate=2), world) == []
    one_node = World(rank=0, world_size=8, local_rank=0, device=torch.device("cpu"), local_world_size=8)
    assert layout_warnings(TrainLoopConfig(), one_node) == []


def test_host_work_gets_the_ranks_share_of_the_cores():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets it
    try:
        from upcycle.hardware import usable_cores

        with host_threads(1):
            assert torch.get_num_threads() == usable_cores()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_file_written_elsewhere_is_waited_for(tmp_path):
    target = tmp_path / "data.json"
    threading.Timer(0.3, target.write_text, args=("{}",)).start()
    assert wait_for_file(target, timeout_s=10, interval_s=0.05)
    assert not wait_for_file(tmp_path / "never.json", timeout_s=0.2, interval_s=0.05)


def test_a_file_system_without_locks_warns_and_trains_on(tmp_path, monkeypatch, capsys):
    import fcntl

    from upcycle.train.trainer import _lock_out

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")  # NFSv3 without lockd; Lustre without flock: ENOSYS

    monkeypatch.setattr(fcntl, "flock", no_locks)
    handle = _lock_out(tmp_path / "out", cpu_world(world_size=1))
    try:
        assert handle is not None and (tmp_path / "out" / ".lock").read_text().strip().isdigit()
        assert "cannot lock" in capsys.readouterr().err
    finally:
        handle.close()
