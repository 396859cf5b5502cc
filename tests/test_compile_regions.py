"""model.compile: one compiled graph serves blocks of every stochastic-depth rate (models/compile.py)."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath
from torch._dynamo.utils import counters

from dora_lightning.models.compile import TensorDropPath, compile_regions_, tensor_drop_paths_
from dora_lightning.module import DoRAModule

DEEP_MICRO = dict(
    backbone="vit_tiny_patch16_224",
    img_size=32,
    patch_size=8,
    depth=12,  # as ViT-S: more blocks than dynamo's 8 graphs per code object
    embed_dim=48,
    num_heads=3,
    out_dim=64,
    head_hidden_dim=32,
    head_bottleneck_dim=16,
    drop_path_rate=0.1,
)


def _train_steps(module: DoRAModule) -> None:
    for size in (32, 16, 32, 16):  # global and local views
        module.student.backbone(torch.randn(4, 3, size, size)).sum().backward()
        with torch.no_grad():
            module.teacher.backbone(torch.randn(4, 3, 32, 32))


def test_a_deep_students_blocks_share_graphs_instead_of_hitting_the_recompile_limit():
    """12 student blocks with 12 drop-path rates: before, each rate was a graph of its own and the cache of
    Block.forward filled up at 8 (blocks 7-11 ran eager); now a handful of graphs cover every block."""
    torch._dynamo.reset()
    counters.clear()
    module = DoRAModule(**DEEP_MICRO)
    compile_regions_(module.student, module.teacher, backend="eager")
    _train_steps(module)
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    rates = {
        round(1 - float(m.keep_prob), 4) for m in module.student.modules() if isinstance(m, TensorDropPath)
    }
    assert len(rates) == 11  # block 0's rate is 0: timm puts an Identity there
    assert not any(isinstance(m, TensorDropPath) for m in module.teacher.modules())  # no stochastic depth
    assert not any(type(m) is DropPath for m in module.modules())
    torch._dynamo.reset()


def test_the_state_dict_is_unchanged_by_the_replacement():
    module = DoRAModule(**DEEP_MICRO)
    before = list(module.state_dict())
    compile_regions_(module.student, module.teacher, backend="eager")
    assert list(module.state_dict()) == before
    torch._dynamo.reset()


@pytest.mark.parametrize("drop_prob", [0.1, 0.5])
def test_tensor_drop_path_drops_whole_samples_at_its_rate_and_keeps_the_mean(drop_prob):
    torch.manual_seed(0)
    layer = TensorDropPath(drop_prob)
    x = torch.ones(20000, 3, 2)
    y = layer(x)
    per_sample = y.flatten(1)
    kept = per_sample[:, 0] != 0
    assert torch.all(per_sample[kept] == per_sample[kept][:, :1])  # a sample is kept or dropped whole
    assert abs(1 - kept.float().mean().item() - drop_prob) < 0.01
    assert torch.allclose(per_sample[kept], torch.full_like(per_sample[kept], 1 / (1 - drop_prob)))
    assert abs(y.mean().item() - 1.0) < 0.02
    assert torch.equal(layer.eval()(x), x)


def test_tensor_drop_paths_replaces_timm_drop_paths_at_their_rates():
    block = torch.nn.Sequential(DropPath(0.2), torch.nn.Sequential(DropPath(0.3, scale_by_keep=False)))
    assert tensor_drop_paths_(block) == 2
    assert [round(1 - float(m.keep_prob), 6) for m in block.modules() if isinstance(m, TensorDropPath)] == [
        0.2,
        0.3,
    ]
    assert block[1][0].scale_by_keep is False
    with pytest.raises(ValueError, match="drop_prob must be in"):
        TensorDropPath(1.0)
