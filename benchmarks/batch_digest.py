"""Digests of the first batches a config's data module produces: two trees whose data paths should give the same
clips (a refactor, a reader change that should only touch other kinds of file) must print the same lines.

Usage (docs/benchmarks.md, "Learning"):

    .venv/bin/python benchmarks/batch_digest.py --config configs/demo.yaml --batches 156 > new.json
    cd /path/to/old/checkout && PYTHONPATH=. /path/to/.venv/bin/python benchmarks/batch_digest.py ... > old.json
    cmp old.json new.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from itertools import islice

import torch
import yaml
from jsonargparse import ArgumentParser

from dora_lightning.data.datamodule import VideoClipDataModule


def batch_digest(batch: dict) -> str:
    """SHA-256 (first 16 hex digits) over every tensor of a batch, by key, in key order."""
    digest = hashlib.sha256()
    for key in sorted(batch):
        value = batch[key]
        for tensor in value if isinstance(value, list) else [value]:
            if isinstance(tensor, torch.Tensor):
                digest.update(key.encode())
                digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument(
        "--config", default="configs/demo.yaml", help="a `dora fit` config; its data section is used"
    )
    cli.add_argument("--batches", type=int, default=156, help="how many batches of the first epoch")
    args = cli.parse_args()
    parser = ArgumentParser()
    parser.add_class_arguments(VideoClipDataModule, "data")
    with open(args.config) as handle:
        section = yaml.safe_load(handle)["data"]
    data = parser.instantiate_classes(parser.parse_object({"data": section})).data
    with tempfile.TemporaryDirectory() as index_cache:  # a fresh index: the tree under test builds its own
        data.index_cache = index_cache
        data.setup("fit")
        digests = [batch_digest(batch) for batch in islice(data.train_dataloader(), args.batches)]
    videos = [[v.path, v.num_frames, str(v.fps), v.width, v.height] for v in data.videos]
    print(json.dumps({"config": args.config, "videos": videos, "batches": digests}))


if __name__ == "__main__":
    main()
