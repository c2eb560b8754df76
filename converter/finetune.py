"""Fine-tune a compressed model, distilling from the original: resumable, deterministic, DDP-ready.

The factor structure (the ranks) stays fixed; by default every weight trains, or only the
decomposed blocks (`train_only_decomposed`). The loss mixes knowledge distillation from the
original model (KL divergence of temperature-softened logits, Hinton et al. 2015) with the label
loss; optionally mixup shows teacher and student the same mixed images. Defaults that work for
the zoo models: SGD with Nesterov momentum 0.9, lr 1e-3, weight decay 5e-4, cosine decay to zero
per step, batch 128, T = 4, alpha = 0.9 (AdamW: lr 3e-4, weight decay 0.05). The rate is low on
purpose: CP blocks (1×1, depthwise, 1×1) diverged at SGD lr 0.01 and 3e-3 on ResNet-20, while 1e-3
was the best rate tried for both CP and Tucker-2 (2 epochs on the 5,085 CIFAR training images: CP
87.8 → 91.8 %, Tucker-2 67.6 → 87.0 % on 500 test images, original 91.0).

Device: `device` "auto" trains on CUDA when torch sees a GPU, else on the CPU (bfloat16 autocast on
CUDA and on CPUs with AMX, whose bfloat16 convs outrun float32 ones, unless `amp` is off); student
and teacher go back to where the caller had them, checkpoints hold CPU tensors, and each epoch is
scored in float32, as the model is deployed.

Reproducibility: each epoch's shuffling and augmentation come from a NumPy generator seeded by
(seed, epoch), and the model, optimizer, scheduler and torch RNG states are checkpointed at every
epoch end and, with `checkpoint_every`, every N steps; a run resumed mid-epoch skips the steps
made (replaying their augmentation draws, without reading their images), so a run killed and
resumed ends with exactly the weights of an uninterrupted run (on CPU with a fixed thread count;
GPU kernels may add nondeterminism of their own). Training data is read by `read_groups`: each
rank decodes only its share of every global batch, in DataLoader worker processes.

Multi-GPU / multi-machine: started under torchrun (WORLD_SIZE > 1), training runs under
DistributedDataParallel (nccl on CUDA, gloo on CPU). Every global batch of `batch_size` examples is
split across ranks as DistributedSampler does (rank r takes every world-size-th example), and each
rank's loss is scaled so that DDP's gradient average equals the gradient of the global batch mean:
for a model without BatchNorm the result equals single-process training (with mixup only up to
which images are paired: each rank mixes within its own share). BatchNorm layers
normalize with their own rank's shard statistics (standard DDP behaviour; SyncBatchNorm would need
GPUs), and their running statistics are taken from rank 0 at each epoch end. Only rank 0 prints
and writes checkpoints; on resume it reads the checkpoint and sends it to the other ranks, so the
checkpoint directory need not be shared between machines.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from rankfold.converter.distributed import init_distributed
from rankfold.converter.strict import config_error
from rankfold.converter.ui import console, progress_bar
from rankfold.models import ImageData, ModelSpec, normalize
from rankfold.models.data import (
    Augment,
    TrainAugment,
    augments,
    crop_flip,
    crop_flip_params,
    first_images,
    read_groups,
)
from rankfold.passes.core import ConfigError, DataError, atomic_path
from rankfold.passes.layout import fast_layout, in_conv_layout
from rankfold.runtime.export import eval_mode

matplotlib.use("Agg")  # files only; no display here or in CI
import matplotlib.pyplot as plt  # noqa: E402

CHECKPOINT_FORMAT = "rankfold-finetune-1"
LAST_CHECKPOINT = "finetune_last.pt"
BEST_CHECKPOINT = "finetune_best.pt"
DEFAULT_LR = {"sgd": 1e-3, "adamw": 3e-4}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}
# Settings a resumed run may change: they do not change the trained weights, or (device) only
# as resuming on another machine would.
_RESUME_FREE = ("eval_batch_size", "checkpoint_every", "device")


class FinetuneConfig(BaseModel):
    """Fine-tuning settings; `lr` and `weight_decay` default per optimizer (see module doc)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=0, ge=0)  # 0: no fine-tuning
    lr: float | None = Field(default=None, gt=0)  # None: 1e-3 (SGD) or 3e-4 (AdamW)
    batch_size: int = Field(default=128, ge=1)  # the global batch, split across DDP ranks
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(default=0.9, ge=0, lt=1)  # SGD only
    weight_decay: float | None = Field(default=None, ge=0)  # None: 5e-4 (SGD) or 0.05 (AdamW)
    distill: bool = True
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.9, ge=0, le=1)  # weight of the distillation term
    # Mixup (Zhang et al. 2018) of each image with another, λ ~ Beta(a, a) with a = mixup; the
    # teacher sees the same mixed images, so distillation matches its function between the
    # training images too ("consistent" distillation, Beyer et al. 2022). 0 turns it off.
    mixup: float = Field(default=0.0, ge=0)
    augment: Augment = "auto"  # auto: cifar for 3×32×32 inputs
    train_only_decomposed: bool = False
    # bfloat16 autocast on CUDA and on CPUs with AMX (see `_amp_dtype`); the refit's Adam
    # steps read it too (`refit_autocast`).
    amp: bool = True
    # auto: CUDA when torch sees a GPU (or the student's own accelerator), else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int = Field(default=256, ge=1)
    # Also checkpoint every this many steps within an epoch (0: at epoch ends only), so a killed
    # run resumes mid-epoch on the same sample order.
    checkpoint_every: int = Field(default=0, ge=0)
    # Share of the training images held out to pick the best epoch on; 0 keeps the last epoch.
    # The evaluation data is only reported per epoch: choosing on it would make the score
    # optimistic (model selection on the test set).
    validation: float = Field(default=0.0, ge=0, lt=0.5)

    @model_validator(mode="after")
    def _optimizer_defaults(self) -> FinetuneConfig:
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer]
        return self


def finetune_config(
    settings: Mapping[str, Any], source: str = "fine-tuning settings"
) -> FinetuneConfig:
    """A FinetuneConfig from a mapping; invalid settings give a one-line ConfigError."""
    try:
        return FinetuneConfig.model_validate(dict(settings))
    except ValidationError as exc:
        raise config_error(exc, FinetuneConfig, source) from None


@dataclass
class FinetuneResult:
    """Per-epoch history (epoch, loss, train_accuracy, validation_accuracy, eval_accuracy, lr,
    seconds), the epoch whose weights were kept and how it was chosen."""

    history: list[dict[str, Any]]
    best_epoch: int | None  # the epoch kept; 0: the model as it came, no epoch was better
    best_accuracy: float | None  # its validation accuracy (None: the last epoch was kept)
    resumed_from: int | None  # the completed epoch a resumed run continued from
    selected_by: str = "last epoch"  # or "validation split of N training images"
    device: str = "cpu"  # where it trained, e.g. "cuda:0 (NVIDIA H200)"
    processes: int = 1  # torchrun processes it trained in (each on its own GPU with CUDA)
    # With a validation split, the model as it came (epoch 0), the first candidate.
    validation_before: float | None = None
    eval_before: float | None = None
    precision: str = "float32"  # or "bfloat16 autocast" (CUDA, AMX CPUs), "float16 autocast"

    @property
    def final_accuracy(self) -> float | None:
        """Eval accuracy of the weights the model was left with."""
        if self.best_epoch == 0:
            return self.eval_before
        kept = [row for row in self.history if row["epoch"] == self.best_epoch]
        return kept[0]["eval_accuracy"] if kept else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha)·CE(student, labels).

    The T² factor keeps the distillation gradients' scale independent of T (Hinton et al. 2015).
    `reduction="none"` gives one loss per example; "mean" averages them.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    student_logits = student_logits.float()
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(dim=1)
    ce = F.cross_entropy(student_logits, labels, reduction="none")
    per_example = alpha * temperature**2 * kl + (1 - alpha) * ce
    return per_example.mean() if reduction == "mean" else per_example


def mixup_weights(rng: np.random.Generator, n: int, concentration: float) -> np.ndarray:
    """Each example's share λ ~ Beta(a, a) of its mixed image, as float32."""
    return rng.beta(concentration, concentration, n).astype(np.float32)


def mix(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """λ·x_i + (1 − λ)·x_{i−1}: each image mixed with the one before it in the batch (the order
    is already shuffled)."""
    w = weights.view(-1, *([1] * (x.ndim - 1)))
    return w * x + (1 - w) * x.roll(1, 0)


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    train: ImageData,
    spec: ModelSpec,
    config: FinetuneConfig,
    checkpoint_dir: str | Path,
    eval_data: ImageData | None = None,
    resume: bool = False,
    decomposed_names: Sequence[str] = (),
    seed: int = 0,
    validation: ImageData | None = None,
    origin: Mapping[str, Any] | None = None,
) -> FinetuneResult:
    """Train `student` in place; leave it with the weights of the last epoch, or with
    `config.validation` of the training images held out, of the epoch best on them, the model
    as it came (epoch 0) included: fine-tuning a model already close to its teacher on few
    images can lower its accuracy. `validation`: the held-out images, when the caller split
    them off before (so that nothing it fitted read them); by default drawn here from `train`.

    `teacher` (the original model) is needed when `config.distill`. `decomposed_names` are the
    dotted names of the factorized blocks, needed for `train_only_decomposed`. Checkpoints go to
    `checkpoint_dir` (finetune_last.pt every epoch, finetune_best.pt at each new best); with
    `resume` a run continues from finetune_last.pt. Ctrl-C leaves the last complete checkpoint and
    re-raises. `seed` fixes shuffling, augmentation and the RNGs. `origin`: plain data on what
    made the student (settings, file digests), kept in the checkpoints; a resumed run must
    give the same. The student is returned in eval mode.
    """
    if config.epochs == 0:
        return FinetuneResult([], None, None, None)
    _check_inputs(student, teacher, train, spec, config, eval_data)
    if validation is None:
        train, validation = validation_split(train, config.validation, seed)
    directory = Path(checkpoint_dir)
    device = training_device(config.device, student)
    saved_flags = [(p, p.requires_grad) for p in student.parameters()]
    # Both models train on `device` and go back where the caller had them.
    homes = [(module, _device_of(module)) for module in (student, teacher) if module is not None]
    rank, world, created_group = init_distributed(device)
    try:
        if len(train) < world:
            raise DataError(
                f"the training data has {len(train)} example(s) for {world} processes; give at "
                "least one example per process"
            )
        if world > 1 and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        for module, _ in homes:
            module.to(device)
        trainable = _select_trainable(student, config, decomposed_names)
        with _isolated_rng(device), in_conv_layout((student, teacher)):
            return _Trainer(
                student,
                teacher,
                train,
                spec,
                config,
                seed,
                directory,
                eval_data,
                validation,
                device,
                rank,
                world,
                origin or {},
            ).run(trainable, resume, decomposed_names)
    finally:
        for module, home in homes:
            module.to(home)
        for parameter, flag in saved_flags:
            parameter.requires_grad_(flag)
        student.eval()
        if created_group:
            dist.destroy_process_group()


def validation_split(
    train: ImageData, share: float, seed: int
) -> tuple[ImageData, ImageData | None]:
    """(training part, held-out part): `share` of the images, drawn with `seed`, held out to
    choose the epoch on; (train, None) when `share` is 0."""
    if share == 0:
        return train, None
    held = max(1, round(share * len(train)))
    if held >= len(train):
        raise DataError(
            f"a validation share of {share:g} leaves no training image of {len(train)}; lower "
            "--validation or give more training data"
        )
    order = np.random.default_rng(seed).permutation(len(train))
    keep, hold = np.sort(order[held:]), np.sort(order[:held])
    return train.take(keep), train.take(hold)


def check_resume(
    checkpoint_dir: str | Path,
    config: FinetuneConfig,
    seed: int,
    origin: Mapping[str, Any] | None = None,
    data: Mapping[str, str | None] | None = None,
) -> None:
    """Before any other work: the checkpoint `--resume` will continue from is readable and was
    made with these settings, from the same `origin` (see `finetune`) and, where `data` gives
    their fingerprints ("train", "eval"), on the same data (a missing checkpoint is fine: the
    run then starts from epoch 0)."""
    path = Path(checkpoint_dir) / LAST_CHECKPOINT
    if path.is_file():
        payload = _load_checkpoint(path)
        _check_origin(path, payload, dict(origin or {}))
        _check_settings(path, payload, {**config.model_dump(), "seed": seed})
        if data is not None:
            _check_data(path, payload, data)


def _check_origin(path: Path, payload: dict[str, Any], ours: dict[str, Any]) -> None:
    """A checkpoint fine-tuned from another compressed model would be published as this run's."""
    theirs = payload.get("origin")
    if theirs is None:
        raise ConfigError(
            f"{path} does not record the compression it was fine-tuned from (an older rankfold "
            "wrote it); start over without --resume"
        )
    changed = [
        f"{key}: {theirs.get(key)!r} (now {ours.get(key)!r})"
        for key in sorted(theirs.keys() | ours.keys())
        if theirs.get(key) != ours.get(key)
    ]
    if changed:
        raise ConfigError(
            f"{path} was fine-tuned from another compression ({'; '.join(changed[:3])}); "
            "resume with the same settings and files, or start over without --resume"
        )


def _check_data(path: Path, payload: dict[str, Any], ours: Mapping[str, str | None]) -> None:
    for key, which in (("train", "training"), ("eval", "evaluation")):
        if payload["data"][key] != ours[key]:
            raise ConfigError(
                f"{path} was made with other {which} data; resume with the same data, or "
                "start over without --resume"
            )


def _check_settings(path: Path, payload: dict[str, Any], ours: dict[str, Any]) -> None:
    theirs = payload["config"]
    changed = [
        f"{key}={theirs.get(key)!r} (now {ours[key]!r})"
        for key in ours
        if key not in _RESUME_FREE and theirs.get(key) != ours[key]
    ]
    if changed:
        raise ConfigError(
            f"{path} was made with other settings: {', '.join(changed[:3])}; resume with the "
            "same settings, or start over without --resume"
        )


class _Trainer:
    """One fine-tuning run; split out of `finetune` so each step reads on its own."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        train: ImageData,
        spec: ModelSpec,
        config: FinetuneConfig,
        seed: int,
        directory: Path,
        eval_data: ImageData | None,
        validation: ImageData | None,
        device: torch.device,
        rank: int,
        world: int,
        origin: Mapping[str, Any],
    ) -> None:
        self.student, self.train, self.spec, self.config = student, train, spec, config
        self.seed = seed
        # What a resumed run must share with the checkpoint's: the settings and the seed, and
        # what made the student.
        self.settings = {**config.model_dump(), "seed": seed}
        self.origin = dict(origin)
        self.teacher = teacher if config.distill else None
        self.directory, self.eval_data, self.device = directory, eval_data, device
        self.validation = validation
        self.rank, self.world = rank, world
        self.augment = augments(config.augment, spec)
        self.amp_dtype = _amp_dtype(device, config.amp)
        self.precision = "float32"
        if self.amp_dtype is not None:
            self.precision = f"{str(self.amp_dtype).removeprefix('torch.')} autocast"
        self.device_label = str(device)
        if device.type == "cuda":
            self.device_label += f" ({torch.cuda.get_device_name(device)})"
        self.fingerprint = {
            "train": train.fingerprint(),
            "eval": None if eval_data is None else eval_data.fingerprint(),
        }
        self.steps_per_epoch = len(_global_batches(len(train), config.batch_size, world, 0, 0)[0])

    # ---- the run ------------------------------------------------------------------------------

    def run(
        self, trainable: list[nn.Parameter], resume: bool, decomposed: Sequence[str]
    ) -> FinetuneResult:
        config = self.config
        optimizer = _optimizer(trainable, config)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.epochs * self.steps_per_epoch
        )
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        model: nn.Module = self.student
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(self.student, device_ids=device_ids)

        state = _RunState()
        payload = self._read_checkpoint() if resume else None
        if payload is not None:
            self._restore(payload, optimizer, scheduler, scaler, state)
            within = f", step {state.step}/{self.steps_per_epoch}" if state.step else ""
            self._note(f"resuming fine-tuning after epoch {state.epoch}/{config.epochs}{within}")
        else:
            if resume:
                self._note(f"no checkpoint in {self.directory}; fine-tuning starts fresh")
            torch.manual_seed(self.seed + self.rank)
            random.seed(self.seed)
            np.random.seed(self.seed)
            if self.validation is not None:
                self._start_as_candidate(state)
            # An epoch-0 checkpoint: Ctrl-C during the first epoch still leaves one to resume.
            self._save_last(optimizer, scheduler, scaler, state)
        resumed_from = state.epoch if payload is not None else None

        frozen = _frozen_modules(self.student, decomposed) if config.train_only_decomposed else []
        if self.rank == 0 and state.epoch < config.epochs:
            precision = "" if self.amp_dtype is None else f", {self.precision}"
            processes = f" in {self.world} processes" if self.world > 1 else ""
            console.print(f"fine-tuning on {self.device_label}{precision}{processes}")
        for epoch in range(state.epoch + 1, config.epochs + 1):
            start = time.perf_counter()
            # A run resumed mid-epoch reports the rate the epoch started with, as the first did.
            if not state.step:
                state.epoch_lr = optimizer.param_groups[0]["lr"]
            lr = state.epoch_lr
            loss, train_accuracy = self._train_epoch(
                model, optimizer, scheduler, scaler, frozen, epoch, state
            )
            self._sync_buffers()
            eval_accuracy = None if self.eval_data is None else self._evaluate(self.eval_data)
            chosen_on = None if self.validation is None else self._evaluate(self.validation)
            state.epoch, state.step, state.partial = epoch, 0, None
            state.history.append(
                {
                    "epoch": epoch,
                    "loss": loss,
                    "train_accuracy": train_accuracy,
                    "validation_accuracy": chosen_on,
                    "eval_accuracy": eval_accuracy,
                    "lr": lr,
                    "seconds": time.perf_counter() - start,
                }
            )
            improved = chosen_on is not None and (
                state.best_accuracy is None or chosen_on > state.best_accuracy
            )
            if improved:
                state.best_epoch, state.best_accuracy = epoch, chosen_on
                state.best_model = _cpu_state(self.student)
                self._save_best(state)
            self._save_last(optimizer, scheduler, scaler, state)
            self._report_epoch(state.history[-1], improved)

        if self.validation is None:
            return FinetuneResult(
                state.history,
                state.epoch,
                None,
                resumed_from,
                device=self.device_label,
                processes=self.world,
                precision=self.precision,
            )
        if state.best_model is not None:
            self.student.load_state_dict(state.best_model)
        if state.best_epoch == 0:
            self._note(
                "no epoch beat the model before fine-tuning on the validation split "
                f"({100 * state.best_accuracy:.2f} %); it is kept"
            )
        selected_by = f"validation split of {len(self.validation)} training images"
        return FinetuneResult(
            state.history,
            state.best_epoch,
            state.best_accuracy,
            resumed_from,
            selected_by,
            self.device_label,
            self.world,
            state.validation_before,
            state.eval_before,
            self.precision,
        )

    def _start_as_candidate(self, state: _RunState) -> None:
        """The model as it came is epoch 0's candidate: an epoch must beat it to be kept."""
        state.validation_before = self._evaluate(self.validation)
        state.eval_before = None if self.eval_data is None else self._evaluate(self.eval_data)
        state.best_epoch, state.best_accuracy = 0, state.validation_before
        state.best_model = _cpu_state(self.student)
        self._save_best(state)
        if self.rank == 0:
            evaluated = (
                "" if state.eval_before is None else f", eval {100 * state.eval_before:.2f} %"
            )
            console.print(
                f"before fine-tuning: validation {100 * state.validation_before:.2f} %{evaluated}"
            )

    def _train_epoch(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        frozen: list[nn.Module],
        epoch: int,
        state: _RunState,
    ) -> tuple[float, float]:
        config = self.config
        model.train()
        for module in frozen:
            # Not eval(), which recurses into the blocks: frozen BatchNorms keep their statistics.
            module.training = False
        groups, rng = _global_batches(
            len(self.train), config.batch_size, self.world, self.seed, epoch
        )
        # Mixup draws come from a generator of their own, so turning it on leaves the crops as
        # they were.
        mixing = np.random.default_rng([self.seed, epoch, 1]) if config.mixup > 0 else None
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, examples (this rank)
        done = state.step  # steps of this epoch a resumed run already made
        if done:
            for indices in groups[:done]:  # the same draws as the interrupted run made
                if self.augment == "cifar":
                    crop_flip_params(rng, len(indices))
                if mixing is not None:
                    mixup_weights(mixing, len(indices), config.mixup)
            if self.rank == 0:  # the checkpoint holds all ranks' sums; the others start at 0
                totals = state.partial.clone()
        description = f"fine-tune {epoch}/{config.epochs}"
        local = slice(self.rank, None, self.world)
        per_image = TrainAugment(self.seed, epoch) if self.augment == "resized-crop" else None
        # Each rank reads only its share of every global batch, in worker processes ahead of use.
        shares = [indices[local] for indices in groups[done:]]
        reads = read_groups(self.train, shares, augment=per_image)
        started, seen = time.perf_counter(), 0
        with self._progress(description, len(groups) - done) as advance:
            for step, indices, (images, labels, kept) in zip(
                range(done + 1, len(groups) + 1), groups[done:], reads, strict=True
            ):
                if self.augment == "cifar":
                    # Drawn for the whole global batch on every rank, then sliced, so each
                    # example gets the same crop and flip whatever the world size.
                    crops = crop_flip_params(rng, len(indices))
                    images = crop_flip(images, *(part[local][kept] for part in crops))
                x = normalize(images, self.spec).to(self.device, non_blocking=True)
                y = torch.from_numpy(labels).to(self.device)
                weights = None
                if mixing is not None:
                    weights = torch.from_numpy(
                        mixup_weights(mixing, len(indices), config.mixup)[local][kept]
                    ).to(self.device)
                    x = mix(x, weights)
                x = fast_layout(x, self.device)
                with self._autocast():
                    logits, per_example = self._loss(model, x, y, weights)
                # Sum over this rank's share of the global batch, scaled so that DDP's average
                # over ranks is the mean over the global batch even when shares differ in size.
                loss = per_example.sum() * (self.world / len(indices))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if weights is not None:  # scored against each mixed image's larger part
                    y = torch.where(weights >= 0.5, y, y.roll(1))
                correct = (logits.detach().argmax(1) == y).sum()
                totals += torch.tensor(
                    [float(per_example.detach().sum()), float(correct), len(y)],
                    dtype=torch.float64,
                )
                seen += len(indices)
                rate = seen / max(time.perf_counter() - started, 1e-9)
                advance(
                    f"loss {totals[0] / totals[2]:.3f}  acc {100 * totals[1] / totals[2]:.1f} %"
                    f"  {rate:.0f} img/s"
                )
                every = config.checkpoint_every
                if every and step % every == 0 and step < len(groups):
                    state.step, state.partial = step, self._all_reduce(totals.clone())
                    self._save_last(optimizer, scheduler, scaler, state)
        totals = self._all_reduce(totals)
        return float(totals[0] / totals[2]), float(totals[1] / totals[2])

    def _loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss per example). With mixup `weights`, x holds mixed images and the label
        loss is the same mix of the two images' labels; the teacher sees the same mixed images."""
        config = self.config
        logits = model(x)
        teacher_logits = None if self.teacher is None else self._teacher_logits(self.teacher, x)

        def loss_for(labels: torch.Tensor) -> torch.Tensor:
            if teacher_logits is None:
                return F.cross_entropy(logits.float(), labels, reduction="none")
            distill = (config.temperature, config.alpha, "none")
            return kd_loss(logits, teacher_logits, labels, *distill)

        per_example = loss_for(y)
        if weights is not None:
            # Only the label term depends on the labels, so this mixes the label terms alone.
            per_example = weights * per_example + (1 - weights) * loss_for(y.roll(1))
        return logits, per_example

    @staticmethod
    def _teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with eval_mode(teacher), torch.no_grad():
            return teacher(x.to(_device_of(teacher))).to(x.device)

    def _evaluate(self, data: ImageData) -> float:
        """Top-1 accuracy on `data`, each rank scoring its share."""
        indices = np.arange(self.rank, len(data), self.world)
        size = self.config.eval_batch_size
        parts = [indices[start : start + size] for start in range(0, len(indices), size)]
        totals = torch.zeros(2, dtype=torch.float64)
        # In float32, as the model is deployed: an epoch is chosen and reported on these scores.
        with eval_mode(self.student), torch.no_grad():
            for images, labels, _ in read_groups(data, parts):
                if not len(labels):
                    continue
                x = fast_layout(normalize(images, self.spec).to(self.device), self.device)
                y = torch.from_numpy(labels).to(self.device)
                correct = (self.student(x).argmax(1) == y).sum()
                totals += torch.tensor([float(correct), len(y)], dtype=torch.float64)
        totals = self._all_reduce(totals)
        return float(totals[0] / totals[1])

    # ---- checkpoints --------------------------------------------------------------------------

    def _save_last(self, optimizer, scheduler, scaler, state: _RunState) -> None:
        if self.rank != 0:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "epoch": state.epoch,
            "step": state.step,  # steps made of epoch + 1 (mid-epoch checkpoints)
            "partial": state.partial,  # that epoch's loss sum, correct, examples so far
            "epoch_lr": state.epoch_lr,
            "config": self.settings,
            "origin": self.origin,
            "data": self.fingerprint,
            "world_size": self.world,
            # On the CPU, so that a checkpoint written on a GPU loads on any machine.
            "model": _cpu_state(self.student),
            "optimizer": _on_cpu(optimizer.state_dict()),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "history": state.history,
            "best_epoch": state.best_epoch,
            "best_accuracy": state.best_accuracy,
            "best_model": state.best_model,
            "validation_before": state.validation_before,
            "eval_before": state.eval_before,
            "rng": _rng_state(self.device),
        }
        _save(payload, self.directory / LAST_CHECKPOINT)

    def _save_best(self, state: _RunState) -> None:
        if self.rank != 0:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "epoch": state.best_epoch,
            "eval_accuracy": state.best_accuracy,
            "config": self.settings,
            "model": state.best_model,
        }
        _save(payload, self.directory / BEST_CHECKPOINT)

    def _read_checkpoint(self) -> dict[str, Any] | None:
        """Rank 0 reads finetune_last.pt (None when absent) and sends it to the other ranks."""
        payload, problem = None, None
        if self.rank == 0:
            try:
                payload = _load_checkpoint(self.directory / LAST_CHECKPOINT)
            except ConfigError as exc:
                problem = str(exc)  # sent along, so no rank waits for a payload that never comes
        if self.world > 1:
            box = [(payload, problem)]
            dist.broadcast_object_list(box, src=0)
            payload, problem = box[0]
        if problem is not None:
            raise ConfigError(problem)
        return payload

    def _restore(self, payload, optimizer, scheduler, scaler, state: _RunState) -> None:
        path = self.directory / LAST_CHECKPOINT
        _check_origin(path, payload, self.origin)
        _check_settings(path, payload, self.settings)
        _check_data(path, payload, self.fingerprint)
        try:
            self.student.load_state_dict(payload["model"])
        except RuntimeError:
            # Same settings and files: the plan moved, which only timings do.
            raise ConfigError(
                f"{path} holds weights of another plan than this run's (the latency gate's "
                "timings moved a layer?); start over without --resume, or with --plan to fix "
                "the plan"
            ) from None
        if payload["world_size"] != self.world:
            self._note(
                f"the checkpoint was written by {payload['world_size']} process(es), this run has "
                f"{self.world}; the result will differ slightly from an uninterrupted run"
            )
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        scaler.load_state_dict(payload["scaler"])
        _set_rng_state(payload["rng"], self.device)
        state.epoch = payload["epoch"]
        state.step, state.partial = payload.get("step", 0), payload.get("partial")
        state.epoch_lr = payload.get("epoch_lr")
        state.history = list(payload["history"])
        state.best_epoch = payload["best_epoch"]
        state.best_accuracy = payload["best_accuracy"]
        state.best_model = payload["best_model"]
        state.validation_before = payload.get("validation_before")
        state.eval_before = payload.get("eval_before")

    # ---- distributed and console helpers ------------------------------------------------------

    def _all_reduce(self, totals: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return totals
        # nccl reduces device tensors only; float64 keeps the counts exact.
        reduced = totals.to(self.device)
        dist.all_reduce(reduced)
        return reduced.cpu()

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics, so evaluation and checkpoints agree."""
        if self.world == 1:
            return
        for buffer in self.student.buffers():
            dist.broadcast(buffer, src=0)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _progress(self, description: str, total: int) -> contextlib.AbstractContextManager:
        if self.rank != 0:
            return contextlib.nullcontext(lambda label="": None)
        return progress_bar(description, total)

    def _note(self, message: str) -> None:
        if self.rank == 0:
            console.print(f"[yellow]{message}[/yellow]")

    def _report_epoch(self, row: dict[str, Any], improved: bool) -> None:
        if self.rank != 0:
            return
        evaluated = (
            "" if row["eval_accuracy"] is None else f", eval {100 * row['eval_accuracy']:.2f} %"
        )
        if row["validation_accuracy"] is not None:
            evaluated += f", validation {100 * row['validation_accuracy']:.2f} %" + (
                " (best)" if improved else ""
            )
        mixed = " (mixed images)" if self.config.mixup else ""
        console.print(
            f"epoch {row['epoch']}/{self.config.epochs}: loss {row['loss']:.4f}, train "
            f"{100 * row['train_accuracy']:.2f} %{mixed}{evaluated}, lr {row['lr']:.2e}, "
            f"{row['seconds']:.0f} s"
        )


@dataclass
class _RunState:
    epoch: int = 0
    step: int = 0  # steps made of the next epoch, when checkpointed mid-epoch
    partial: torch.Tensor | None = None  # its loss sum, correct and example counts (all ranks)
    epoch_lr: float | None = None  # the learning rate that epoch started with
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_accuracy: float | None = None
    best_model: dict[str, torch.Tensor] | None = None
    validation_before: float | None = None  # the model as it came, on the validation split
    eval_before: float | None = None  # ... on the evaluation data


def plot_history(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str,
    reference: Mapping[str, float | None] | None = None,
) -> Path:
    """Accuracy per epoch (train and eval), with dashed lines for `reference` accuracies."""
    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    train = [100 * row["train_accuracy"] for row in history]
    ax.plot(epochs, train, marker="o", label="train (augmented, running)", color="#9aa5b1")
    scored = [
        (row["epoch"], 100 * row["eval_accuracy"])
        for row in history
        if row["eval_accuracy"] is not None
    ]
    if scored:
        ax.plot(*zip(*scored), marker="o", label="eval", color="#2b7bba")
    colors = ("#d1495b", "#edae49", "#00798c", "#30638e")
    for (label, value), color in zip((reference or {}).items(), colors * 4):
        if value is not None:
            ax.axhline(100 * value, linestyle="--", linewidth=1, color=color, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    if epochs:
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


# ---- data ----------------------------------------------------------------------------------------


def _global_batches(
    n: int, batch_size: int, world: int, seed: int, epoch: int
) -> tuple[list[np.ndarray], np.random.Generator]:
    """This epoch's global batches (a seeded permutation, cut in order) and the generator.

    A last partial batch smaller than the world size is dropped, so every rank gets an example.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    groups = [order[start : start + batch_size] for start in range(0, n, batch_size)]
    if len(groups) > 1 and len(groups[-1]) < world:
        groups.pop()
    return groups, rng


# ---- checks and setup ----------------------------------------------------------------------------


def _check_inputs(
    student: nn.Module,
    teacher: nn.Module | None,
    train: ImageData,
    spec: ModelSpec,
    config: FinetuneConfig,
    eval_data: ImageData | None,
) -> None:
    # Configs built without validation (model_construct) are checked here too.
    if not (config.lr is not None and config.lr > 0):
        raise ConfigError(f"learning rate must be > 0, got {config.lr}; pass e.g. --lr 0.001")
    if config.epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {config.epochs}")
    if config.batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {config.batch_size}")
    if config.distill and teacher is None:
        raise ConfigError(
            "distillation needs the original model as teacher; pass it, or turn it off "
            "(--no-distill)"
        )
    for name, data in (("training", train), ("evaluation", eval_data)):
        if data is None:
            continue
        if len(data) == 0:
            raise DataError(f"the {name} data is empty; give at least one labelled image")
        if tuple(data.image_shape) != spec.input_shape:
            raise DataError(
                f"{name} images are {'×'.join(map(str, data.image_shape))} but model "
                f"'{spec.name}' takes {'×'.join(map(str, spec.input_shape))}; give matching data"
            )
        low, high = int(data.labels.min()), int(data.labels.max())
        if low < 0 or high >= spec.num_classes:
            raise DataError(
                f"{name} labels span [{low}, {high}] but model '{spec.name}' has "
                f"{spec.num_classes} classes; labels must lie in [0, {spec.num_classes - 1}]"
            )
    with eval_mode(student), torch.no_grad():
        probe = student(normalize(first_images(train, 2), spec).to(_device_of(student)))
    if probe.ndim != 2 or probe.shape[1] != spec.num_classes:
        raise ConfigError(
            f"the model outputs shape {tuple(probe.shape)} but model '{spec.name}' has "
            f"{spec.num_classes} classes; fine-tuning needs N×{spec.num_classes} logits"
        )


def _select_trainable(
    student: nn.Module, config: FinetuneConfig, decomposed: Sequence[str]
) -> list[nn.Parameter]:
    """The parameters to train; with train_only_decomposed, the others stop requiring grad."""
    if not config.train_only_decomposed:
        trainable = [p for p in student.parameters() if p.requires_grad]
    else:
        if not decomposed:
            raise ConfigError(
                "train_only_decomposed needs the names of the decomposed blocks; pass "
                "decomposed_names, or train all weights"
            )
        chosen = set()
        for name in decomposed:
            try:
                block = student.get_submodule(name)
            except AttributeError:
                raise ConfigError(
                    f"decomposed block '{name}' is not in the model; pass names from its plan"
                ) from None
            chosen.update(id(p) for p in block.parameters())
        trainable = []
        for parameter in student.parameters():
            parameter.requires_grad_(id(parameter) in chosen)
            if id(parameter) in chosen:
                trainable.append(parameter)
    if not trainable:
        raise ConfigError("the model has no trainable parameters; nothing to fine-tune")
    return trainable


def _frozen_modules(student: nn.Module, decomposed: Sequence[str]) -> list[nn.Module]:
    """Modules outside every decomposed block (they run in eval mode while training)."""
    return [
        module
        for name, module in student.named_modules()
        if not any(name == block or name.startswith(block + ".") for block in decomposed)
    ]


def _optimizer(parameters: list[nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.momentum > 0,
        )
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def _amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bfloat16 autocast on a GPU or a CPU with bfloat16 matrix units (AMX); float16 on GPUs
    without bfloat16; None (float32) when off or elsewhere."""
    if not enabled:
        return None
    if device.type == "cpu":
        return torch.bfloat16 if native_bfloat16_cpu() else None
    if device.type != "cuda":
        return None
    # bfloat16 keeps float32's range (no loss scaling); float16 on GPUs without it.
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def refit_autocast(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The dtype the refit's Adam steps autocast to: bfloat16 where fine-tuning takes it, else
    None (float32); never float16, whose range the refit's unscaled losses would need a scaler
    for."""
    return torch.bfloat16 if _amp_dtype(device, enabled) == torch.bfloat16 else None


def native_bfloat16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX tiles: Intel Xeon since
    Sapphire Rapids), where oneDNN's bfloat16 convs outrun float32 ones (BENCHMARKS.md). torch
    says so only through a private helper; without it, no."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if callable(probe) else False


def training_device(choice: str, student: nn.Module | None = None) -> torch.device:
    """The device `finetune.device` names: "cpu"; "cuda" (the student's GPU if it sits on one);
    "auto", the student's own accelerator, else CUDA when torch sees a GPU, else the CPU.
    "cuda" without a usable GPU is a one-line ConfigError."""
    current = _device_of(student) if student is not None else torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if current.type == "cuda" or (choice == "auto" and current.type != "cpu"):
        return current
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if choice == "cuda":
        raise ConfigError(
            "fine-tuning on CUDA was asked for (--finetune-device cuda) but torch sees no GPU; "
            "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use "
            "--finetune-device auto or cpu"
        )
    return torch.device("cpu")


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in module.state_dict().items()}


def _on_cpu(value: Any) -> Any:
    """`value` (nested dicts, lists and tuples of tensors) with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(item) for item in value)
    return value


# ---- RNG state and files -------------------------------------------------------------------------


@contextlib.contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """Seed and checkpoint RNGs freely inside; the caller's RNG states come back afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """All RNG states, as tensors and plain values (so the file loads with weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _save(payload: dict[str, Any], path: Path) -> None:
    # Write-then-rename: Ctrl-C or a crash mid-write leaves the previous file whole.
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"checkpoint {path} is unreadable ({first}); delete it, or start over without --resume"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{path} is not a rankfold fine-tuning checkpoint; delete it, or start over without "
            "--resume"
        )
    return payload


__all__ = [
    "BEST_CHECKPOINT",
    "LAST_CHECKPOINT",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "finetune_config",
    "kd_loss",
    "plot_history",
]
