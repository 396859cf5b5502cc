"""StopAgreement: after each batch the processes' stop requests are all-reduced (max) and read one batch later, the
same value in every process; queue_to_host brings a device value back without waiting for the device."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ddp import free_port

from dora_lightning.host_copy import queue_to_host
from dora_lightning.stop_agreement import StopAgreement

# per process, the request after each batch: process 0 is signalled before batch 3, process 1 (a signal of higher
# precedence, e.g. SLURM's requeue signal) before batch 5
REQUESTS = ([0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 2, 2])
# the largest request of each batch, read one batch later
AGREED = [0, 0, 0, 0, 1, 1, 2]

CPU = SimpleNamespace(root_device=torch.device("cpu"))


def agree(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        agreement = StopAgreement()
        out[rank] = [agreement.exchange(request, CPU) for request in REQUESTS[rank]]
    finally:
        dist.destroy_process_group()


def test_every_process_reads_the_same_agreement_one_batch_later():
    out = mp.Manager().dict()
    mp.spawn(agree, args=(free_port(), out), nprocs=2, join=True)
    assert out[0] == out[1] == AGREED


def test_without_a_process_group_the_strategys_reduction_is_used_and_reset_forgets():
    calls = []

    def reduce(flag, reduce_op):
        calls.append(reduce_op)
        return flag

    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce)
    agreement = StopAgreement()
    assert [agreement.exchange(request, strategy) for request in (0, 3, 0)] == [0, 0, 3]
    assert calls == ["max"] * 3
    agreement.exchange(2, strategy)
    agreement.reset()  # a new fit: nothing carried over
    assert agreement.exchange(0, strategy) == 0


def test_a_cpu_value_is_on_the_host_at_once():
    values = torch.tensor([1.5, 0.0])
    copy = queue_to_host(values)
    assert copy.arrived() and copy.event is None
    assert torch.equal(copy.wait(), values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_value_comes_through_pinned_memory_behind_an_event():
    values = torch.arange(4, device="cuda", dtype=torch.int32)
    copy = queue_to_host(values)
    assert copy.values.is_pinned() and copy.event is not None
    assert copy.wait().tolist() == [0, 1, 2, 3] and copy.arrived()
