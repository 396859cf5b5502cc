"""Two gloo processes on halves of a batch agree with one process on the whole batch (centre, SK, masks, loss)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import MICRO_MODULE

from dora_lightning.core.loss import update_center
from dora_lightning.module import DoRAModule

MICRO = MICRO_MODULE | {"drop_path_rate": 0.0}


def make_batch(clips: int = 4, frames: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "global_views": [torch.randn(clips, frames, 3, 32, 32, generator=generator)],
        "local_views": [torch.randn(clips, frames, 3, 16, 16, generator=generator) for _ in range(2)],
    }


def step(module: DoRAModule, batch: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with torch.no_grad():
        parts, teacher, tracked = module.compute_loss(batch, teacher_temp=0.04)
        center = update_center(module.center, teacher.flatten(0, -2), 0.9)
    return {"loss": parts.total, "center": center, "sk": tracked.sk_assignment, "masks": tracked.masks}


def worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        module = DoRAModule(**MICRO)
        module.center.normal_(generator=torch.Generator().manual_seed(1))
        half = {key: [v[2 * rank : 2 * rank + 2] for v in views] for key, views in make_batch().items()}
        out[rank] = step(module, half)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one():
    torch.manual_seed(0)
    module = DoRAModule(**MICRO)
    module.center.normal_(generator=torch.Generator().manual_seed(1))
    single = step(module, make_batch())

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(worker, args=(free_port(), out), nprocs=2, join=True)
    ranks = [out[0], out[1]]
    torch.testing.assert_close(ranks[0]["center"], single["center"])
    torch.testing.assert_close(ranks[1]["center"], single["center"])
    torch.testing.assert_close(torch.cat([r["sk"] for r in ranks]), single["sk"])
    assert torch.equal(torch.cat([r["masks"] for r in ranks]), single["masks"])
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single["loss"])
