"""The `dora` command: LightningCLI over DoRAModule and VideoClipDataModule (fit, validate, test, predict)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dora_lightning.data.datamodule import VideoClipDataModule
from dora_lightning.module import DoRAModule


class DoraCLI(LightningCLI):
    """LightningCLI with the links DoRA needs: the data's batch size feeds the lr scaling rule."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.batch_size", "model.batch_size")
        parser.link_arguments("data.seed", "model.seed")


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the `dora` console script."""
    DoraCLI(
        DoRAModule,
        VideoClipDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "DoRA / DINO self-supervised pretraining from long videos (dora-lightning)"
        },
        args=list(args) if args is not None else None,
    )


if __name__ == "__main__":
    main()
