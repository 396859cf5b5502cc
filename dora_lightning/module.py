"""DoRAModule: DoRA (and the DINO baseline) pretraining of a timm ViT on video clips, composed from pure parts."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from dora_lightning.checkpoint_formats import PRETRAIN_KIND
from dora_lightning.core.ema import ema_update_
from dora_lightning.core.grad_clip import per_parameter_clip_
from dora_lightning.core.loss import LossParts, dino_loss, dora_loss, teacher_entropy, update_center
from dora_lightning.core.tracker import (
    SK_EPSILON,
    SK_ITERATIONS,
    TrackerOutput,
    TrackingOptions,
    head_seed,
    sample_heads,
)
from dora_lightning.diagnostics import NonFiniteLossError, TrainingDiagnostics
from dora_lightning.distributed import process_zero_value_if_any_differs
from dora_lightning.loss_watch import LossWatch
from dora_lightning.model_options import (
    batch_problem,
    check_model_options,
    crop_size_problem,
    precision_problem,
)
from dora_lightning.models.backbone import (
    build_vit,
    clip_tracker_inputs,
    forward_features,
    forward_with_last_block_taps,
    patch_size_of,
)
from dora_lightning.models.compile import compile_regions_
from dora_lightning.models.head import DINOHead, cancel_last_layer_grad_
from dora_lightning.models.lean_mlp import use_lean_mlps_
from dora_lightning.models.student_teacher import StudentTeacher
from dora_lightning.optimizer import student_adamw
from dora_lightning.resume_state import prepare_resume
from dora_lightning.rng_states import capture_rng_states, restore_rng_states
from dora_lightning.step_schedules import StepSchedules

__all__ = ["DoRAModule", "NonFiniteLossError", "StudentTeacher", "per_parameter_clip_"]


class DoRAModule(StepSchedules, TrainingDiagnostics, pl.LightningModule):
    """DoRA pretraining (spec A with the corrections of G.1), or the DINO baseline on the same clips.

    Batches come from VideoClipDataModule: ``global_views`` (one (B,T,3,H,W) tensor for DoRA, two for DINO) and
    ``local_views`` (V tensors (B,T,3,h,w)). The teacher (EMA of the student, no drop path) sees the unmasked global
    frames; its last block gives the tracker its attention, queries and keys; the student sees every object's masked
    frames and the local crops in one forward each. Epoch-based settings are turned into optimiser steps.

    Args:
        backbone: any timm ViT name with a class token (weights are never downloaded).
        img_size: the global crop size the ViT is built for (other sizes work through position-embedding interpolation).
        patch_size, depth, embed_dim, num_heads: override the named architecture (e.g. a micro ViT for CPU runs);
            an exported backbone then loads with ``timm.create_model(backbone, <the same overrides>)``.
        drop_path_rate: stochastic depth of the student (the teacher has none).
        out_dim, head_hidden_dim, head_bottleneck_dim: DINO head sizes.
        norm_last_layer: freeze the weight-norm gain of the head's last layer at 1 (the official DoRA run uses False).
        method: ``dora`` (tracker + masked views) or ``dino`` (two global crops per frame, no tracker).
        num_objects: k, objects tracked per clip; at most the number of heads of the last block.
        sk_epsilon, sk_iterations: Sinkhorn-Knopp refinement of the object prototypes.
        mask_mode: ``keep`` the tracked object (the released code) or ``remove`` it (the paper's wording).
        official_compat: reproduce the official arithmetic (first local crop dropped, unreset frame loss,
            batch-shared mask threshold); default off (the corrected method).
        student_temp, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: DINO temperatures.
        center_momentum: momentum of the teacher-output centre.
        momentum_teacher, momentum_teacher_end: cosine EMA momentum schedule (per optimiser step).
        base_lr: learning rate for a total batch of 256 clips (scaled by batch_size x processes x accumulation / 256).
        min_lr, warmup_epochs: cosine lr schedule end and linear warm-up length.
        weight_decay, weight_decay_end: cosine weight-decay schedule (biases and norms get none).
        freeze_last_layer_epochs: epochs during which the head's last layer gets no update.
        clip_grad: per-parameter gradient-norm clip (0 disables).
        batch_size: clips per batch per process (linked from ``data.batch_size`` by the CLI).
        seed: seed of the tracker's head sampling; each process draws its own heads (stream ``seed + global_rank``,
            the released code's per-GPU seed), one draw per training batch (``core.tracker.head_seed``).
        log_images_every_n_steps: every N steps, log one clip's object tracks and frame-0 CLS attention per head to
            TensorBoard (0 disables).
        diagnostics_every_n_steps: every N steps, write the schedule values (``train/lr``, ``wd``, ``momentum``,
            ``teacher_temp``) and the tracker's ``tracker/mask_area_obj{i}`` to the loggers (one device read per N
            steps); ``None`` (default): the Trainer's ``log_every_n_steps``; 0 disables. The losses and the teacher
            entropy are logged every step without waiting for the device.
        lean_mlp: student MLPs save one hidden activation instead of two (same results, less memory; see
            ``models/lean_mlp.py``).
        compile: ``torch.compile`` the transformer blocks and heads (opt-in; compiles at the first step, then faster
            on GPUs; parameter names and checkpoints unchanged; see ``models/compile.py``).
        grad_checkpointing: recompute each student block's activations in the backward pass instead of keeping them
            (timm's ``set_grad_checkpointing``; the same gradients, drop-path masks included): less memory for
            about one more student forward of compute (docs/training.md, "Memory").
    """

    phase_timer: Any = None  # public hook of phase(): set by benchmarks to time the step's phases

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        img_size: int = 224,
        patch_size: int | None = None,
        depth: int | None = None,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        drop_path_rate: float = 0.1,
        out_dim: int = 65536,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        norm_last_layer: bool = False,
        method: Literal["dora", "dino"] = "dora",
        num_objects: int = 3,
        sk_epsilon: float = SK_EPSILON,
        sk_iterations: int = SK_ITERATIONS,
        mask_mode: Literal["keep", "remove"] = "keep",
        official_compat: bool = False,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        center_momentum: float = 0.9,
        momentum_teacher: float = 0.996,
        momentum_teacher_end: float = 1.0,
        base_lr: float = 5e-4,
        min_lr: float = 1e-5,
        warmup_epochs: int = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        freeze_last_layer_epochs: int = 1,
        clip_grad: float = 3.0,
        batch_size: int = 6,
        seed: int = 0,
        log_images_every_n_steps: int = 500,
        lean_mlp: bool = True,
        diagnostics_every_n_steps: int | None = None,
        compile: bool = False,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_model_options(self.hparams)
        shape = dict(patch_size=patch_size, depth=depth, embed_dim=embed_dim, num_heads=num_heads)
        overrides = {k: v for k, v in shape.items() if v is not None}
        try:
            student_backbone, teacher_backbone = (
                build_vit(backbone, img_size=img_size, drop_path_rate=rate, **overrides)
                for rate in (drop_path_rate, 0.0)
            )
        except ValueError as err:
            raise ValueError(f"model.backbone={backbone}: {err}") from err
        if lean_mlp:
            use_lean_mlps_(student_backbone)
        student_backbone.set_grad_checkpointing(grad_checkpointing)
        num_heads = student_backbone.blocks[-1].attn.num_heads
        if method == "dora" and not 1 <= num_objects <= num_heads:
            raise ValueError(
                f"model.num_objects={num_objects} must be between 1 and the {num_heads} heads of {backbone}'s last block"
            )
        head_args = dict(
            in_dim=student_backbone.num_features,
            out_dim=out_dim,
            hidden_dim=head_hidden_dim,
            bottleneck_dim=head_bottleneck_dim,
            norm_last_layer=norm_last_layer,
        )
        self.student = StudentTeacher(student_backbone, DINOHead(**head_args))
        self.teacher = StudentTeacher(teacher_backbone, DINOHead(**head_args))
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.patch_size = patch_size_of(student_backbone)
        self.num_heads = num_heads
        self.register_buffer("center", torch.zeros(1, out_dim))
        # _track draws from head_generator; training_step reseeds it per batch from (seed + rank, draw count)
        self.head_generator = torch.Generator().manual_seed(seed)
        self._head_draws = 0
        self._pending_rng: dict[str, Any] | None = None  # a resumed checkpoint's RNG states (rng_states.py)
        self.checkpoint_planned_steps: int | None = None  # what a resumed checkpoint's schedules spanned
        self._last_attention: tuple[Tensor, tuple[int, int]] | None = None
        self._loss_watch = LossWatch()  # losses on their way to the host (a fresh one at each fit's start)
        self._step_values = None  # StepSchedules.step_values' cache

    # ----------------------------------------------------------------- forward
    def phase(self, name: str) -> AbstractContextManager[Any]:
        """A named phase of the training step (``teacher_fwd``, ``tracker``, ``student_fwd``): a
        ``torch.profiler.record_function("dora/<name>")`` scope, also timed by :attr:`phase_timer` when one is set
        (an object with ``phase(name) -> context manager``; ``benchmarks/step_case.py`` sets one)."""
        scope = torch.profiler.record_function(f"dora/{name}")
        if self.phase_timer is None:
            return scope
        stack = ExitStack()
        stack.enter_context(scope)
        stack.enter_context(self.phase_timer.phase(name))
        return stack

    def _teacher_logits(self, images: Tensor) -> Tensor:
        with torch.no_grad(), self.phase("teacher_fwd"):
            return self.teacher(images)

    def _track(self, global_view: Tensor) -> tuple[Tensor, TrackerOutput]:
        """Teacher pass over all frames and the tracker; returns teacher logits (T,B,D) and the tracker's output."""
        batch, frames = global_view.shape[:2]
        with torch.no_grad(), self.phase("teacher_fwd"):
            taps = forward_with_last_block_taps(self.teacher.backbone, global_view.flatten(0, 1))
            logits = self.teacher.head(taps.cls).unflatten(0, (batch, frames)).transpose(0, 1)

        with self.phase("tracker"):
            inputs = clip_tracker_inputs(taps, batch, frames)
            self._last_attention = (taps.cls_attention.unflatten(0, (batch, frames))[0, 0], taps.grid)
            heads = sample_heads(self.num_heads, self.hparams.num_objects, self.head_generator)
            options = TrackingOptions(
                self.hparams.sk_epsilon,
                self.hparams.sk_iterations,
                self.hparams.official_compat,
                keep_object=self.hparams.mask_mode == "keep",
            )
            tracked = options.track(inputs, heads, global_view, self.patch_size)
        return logits, tracked

    def _student_logits(self, groups: list[Tensor]) -> list[Tensor]:
        """Student logits (V,T,B,D) for each group of views (V,B,T,3,H,W): one backbone pass per group (one
        resolution each), then ONE head pass over all class tokens (the 65536-wide last layer is built once)."""
        groups = [g for g in groups if g.shape[0] > 0]
        with self.phase("student_fwd"):
            cls = [forward_features(self.student.backbone, g.flatten(0, 2))[0] for g in groups]
            logits = self.student.head(torch.cat(cls)).split([c.shape[0] for c in cls])
        return [out.unflatten(0, g.shape[:3]).transpose(1, 2) for out, g in zip(logits, groups, strict=True)]

    def check_batch(self, batch: dict[str, Any]) -> None:
        """Raise ValueError with the fix when a batch does not suit this model (:func:`batch_problem`);
        ``training_step`` checks its first batch."""
        hp = self.hparams
        if problem := batch_problem(batch, hp.method, self.patch_size, hp.backbone):
            raise ValueError(problem)

    def setup(self, stage: str) -> None:
        """Refuse a precision that casts the weights, and the data module's crop sizes that do not hold whole
        patches, before any batch: callbacks (the collapse guard's probe) run the backbone on the first batch before
        ``training_step`` checks it."""
        if self._trainer is not None and (problem := precision_problem(str(self.trainer.precision))):
            raise ValueError(problem)
        transform = getattr(getattr(self._trainer, "datamodule", None), "transform", None)
        for kind in ("global", "local"):
            size = getattr(transform, f"{kind}_size", None)
            if problem := crop_size_problem(kind, size, self.patch_size, self.hparams.backbone):
                raise ValueError(problem)

    def compute_loss(
        self, batch: dict[str, Any], teacher_temp: float
    ) -> tuple[LossParts, Tensor, TrackerOutput | None]:
        """Loss parts, teacher logits and (DoRA) the tracker output for one batch."""
        hp = self.hparams
        local = torch.stack(batch["local_views"]) if batch["local_views"] else None
        if hp.method == "dino":
            globals_ = torch.stack(batch["global_views"])  # (G,B,T,3,H,W)
            teacher = (
                self._teacher_logits(globals_.flatten(0, 2)).unflatten(0, globals_.shape[:3]).transpose(1, 2)
            )
            student_globals, *rest = self._student_logits([globals_] + ([local] if local is not None else []))
            student_local = rest[0] if rest else student_globals[:0]
            parts = dino_loss(
                teacher, student_globals, student_local, self.center, teacher_temp, hp.student_temp
            )
            return parts, teacher, None
        teacher, tracked = self._track(batch["global_views"][0])
        masked = tracked.masked.transpose(0, 1)  # (k,B,T,3,H,W)
        student_masked, *rest = self._student_logits([masked] + ([local] if local is not None else []))
        student_local = rest[0] if rest else student_masked[:0]
        parts = dora_loss(
            teacher,
            student_masked,
            student_local,
            self.center,
            teacher_temp,
            hp.student_temp,
            hp.official_compat,
        )
        return parts, teacher, tracked

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One batch: loss, centre update, logging. Nothing here waits for the device: the loss reaches the host (the
        progress bar and the finiteness check) through :class:`~dora_lightning.loss_watch.LossWatch`, the per-step
        logs are device tensors, and the diagnostics are written every ``diagnostics_every_n_steps`` steps."""
        if batch_idx == 0:
            self.check_batch(batch)
        values = self.step_values()
        self.head_generator.manual_seed(head_seed(self.hparams.seed, self.global_rank, self._head_draws))
        self._head_draws += 1
        parts, teacher, tracked = self.compute_loss(batch, values["teacher_temp"])
        self._loss_watch.push(self.global_step, self.current_epoch, parts.total)
        arrived = self._loss_watch.ready()  # one CPU process: this step's, checked before anything is updated
        self._check_losses(arrived)
        with torch.no_grad():
            entropy = teacher_entropy(teacher, self.center, values["teacher_temp"])
            self.center.copy_(
                update_center(self.center, teacher.flatten(0, -2), self.hparams.center_momentum)
            )
        batch_size = batch["global_views"][0].shape[0]
        logs = {"train/loss": parts.total.detach(), "train/teacher_entropy": entropy}
        if parts.masked is not None:
            logs["train/loss_masked" if self.hparams.method == "dora" else "train/loss_global"] = (
                parts.masked.detach()
            )
        if parts.local is not None:
            logs["train/loss_local"] = parts.local.detach()
        self.log_dict(logs, batch_size=batch_size, prog_bar=False)
        if arrived:  # the newest loss on the host (on a GPU usually the previous step's): a CPU tensor
            self.log("loss", arrived[-1].loss, prog_bar=True, batch_size=batch_size, logger=False)
        self._write_diagnostics(values, tracked, batch_idx)
        if tracked is not None:
            self._log_images(batch["global_views"][0][0], tracked, batch_idx)
        return parts.total

    def configure_model(self) -> None:
        """``model.compile``: compile the blocks and heads in place (``compile_regions_``)."""
        if self.hparams.get("compile"):
            compile_regions_(self.student, self.teacher)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with weight decay on weights only (``optimizer.student_adamw``: fused on CUDA, except under a
        gradient scaler); lr and wd are set every step from the schedules."""
        precision = getattr(self._trainer, "precision_plugin", None)
        return student_adamw(self.student, grad_scaler=getattr(precision, "scaler", None) is not None)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        values = self.step_values()
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] = values["lr"]
            if index == 0:
                group["weight_decay"] = values["wd"]
        if self.global_step < self.hparams.freeze_last_layer_epochs * self.steps_per_epoch:
            cancel_last_layer_grad_(self.student.head)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.hparams.clip_grad > 0:
            per_parameter_clip_(
                [p for g in optimizer.param_groups for p in g["params"]], self.hparams.clip_grad
            )
        if gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimiser, then the EMA teacher: Lightning calls this only on real steps (not accumulation)."""
        super().optimizer_step(*args, **kwargs)
        # global_step still counts the steps before this one
        momentum = self.step_values()["momentum"]
        ema_update_(list(self.teacher.parameters()), list(self.student.parameters()), momentum)

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The checkpoint's ``dora`` section; first every loss not yet checked (waiting for it), so that no
        checkpoint holds the weights a non-finite loss updated (every process saves: they raise together)."""
        self._check_losses(self._loss_watch.ready(wait=True))
        checkpoint["dora"] = {
            "kind": PRETRAIN_KIND,
            "head_draws": self._head_draws,  # the same on every rank: each rank resumes its own stream from it
            **capture_rng_states(self.device),
            "planned_steps": None if self._trainer is None else self.total_steps,  # what the schedules span
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("dora")
        if state is None or state.get("kind") != PRETRAIN_KIND:
            raise ValueError(
                "this checkpoint was not written by `dora fit` (no 'dora' section): `fit --ckpt_path` only resumes "
                "our own runs; evaluate other weights with `dora validate --evaluator NAME --ckpt_path FILE`"
            )
        if "head_draws" not in state:
            rank_zero_warn(
                "this checkpoint predates per-rank head draws: the tracker's head sequence restarts"
            )
        self._head_draws = int(state.get("head_draws", 0))
        self._pending_rng = state
        self.checkpoint_planned_steps = state.get("planned_steps")
        prepare_resume(checkpoint, getattr(self._trainer, "datamodule", None))

    def on_train_start(self) -> None:
        """Refuse a run whose processes start from different steps: each process resolves ``--ckpt_path`` (``last``)
        in its own node's run folder, and one that found no checkpoint would start fresh beside resumed ones."""
        super().on_train_start()  # TrainingDiagnostics: a fresh loss watch and schedule cache
        step = (self.global_step, self.current_epoch)
        if (zero := process_zero_value_if_any_differs(self.trainer.strategy, step)) is not None:
            raise ValueError(
                f"--ckpt_path: the processes of this run start from different checkpoints (process 0 at step "
                f"{zero[0]}, process {self.global_rank} at step {step[0]}); every node must see the run folder "
                "(trainer.default_root_dir on a shared file system), or give --ckpt_path a file every node has"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """After a resume, restore the RNG states here, so the loader's start-up draws do not shift drop-path masks."""
        if self._pending_rng is not None:
            restore_rng_states(self._pending_rng, self.device)
            self._pending_rng = None
