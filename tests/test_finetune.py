"""Fine-tuning with distillation (converter/finetune.py): loss, checkpoints, resume, freezing."""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from planning_helpers import plan_of
from torch import nn

import rankfold.converter.finetune as finetune_module
from rankfold.converter.finetune import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    FinetuneConfig,
    finetune,
    finetune_config,
    kd_loss,
    plot_history,
    training_device,
)
from rankfold.converter.summary import epoch_choice
from rankfold.models import ArrayDataset, ModelSpec
from rankfold.passes.blocks import FactorizedBlock
from rankfold.passes.core import ConfigError, DataError

SPEC = ModelSpec(
    name="tiny", input_shape=(3, 12, 12), num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3
)


class Tiny(nn.Module):
    """Conv + BN + dropout: BN buffers and the dropout RNG both have to survive a resume."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.block = FactorizedBlock(
            OrderedDict(
                pointwise_in=nn.Conv2d(8, 4, 1, bias=False),
                core=nn.Conv2d(4, 4, 3, padding=1, bias=False),
                pointwise_out=nn.Conv2d(4, 8, 1),
            ),
            source="block",
            method="tucker2",
            ranks=(4, 4),
        )
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.block(x)))
        return self.fc(self.drop(x.mean((2, 3))))


def tiny(seed: int) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def synthetic(n: int, seed: int) -> ArrayDataset:
    """Noise images whose class sets which colour channel is brighter: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 160, size=(n, 3, 12, 12))
    for c in range(3):
        x[:, c] += np.where(y == c, 90, 0)[:, None, None]
    return ArrayDataset(x.astype(np.uint8), y)


TRAIN = synthetic(128, 0)
EVAL = synthetic(40, 1)


def config(**settings) -> FinetuneConfig:
    base = {"epochs": 3, "batch_size": 16, "augment": "cifar", "lr": 0.1}
    return FinetuneConfig(**{**base, **settings})


# ---- loss and configuration ----------------------------------------------------------------------


def test_kd_loss_matches_a_hand_computation() -> None:
    student = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    teacher = np.array([[1.0, 1.5, -0.5], [-1.0, 0.0, 2.0]])
    labels = np.array([0, 2])
    t, alpha = 3.0, 0.7

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    p_teacher = np.exp(log_softmax(teacher / t))
    kl = (p_teacher * (np.log(p_teacher) - log_softmax(student / t))).sum(axis=1)
    ce = -log_softmax(student)[np.arange(2), labels]
    expected = alpha * t**2 * kl + (1 - alpha) * ce

    args = (torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), t, alpha)
    per_example = kd_loss(*args, reduction="none")
    np.testing.assert_allclose(per_example.numpy(), expected, rtol=1e-6)
    assert float(kd_loss(*args)) == pytest.approx(expected.mean(), rel=1e-6)
    # alpha 0 is plain cross-entropy; a student equal to its teacher has no distillation loss.
    assert float(kd_loss(*args[:3], t, 0.0)) == pytest.approx(ce.mean(), rel=1e-6)
    same = torch.tensor(teacher)
    assert float(kd_loss(same, same, args[2], t, 1.0)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(*args[:3], 0.0, alpha)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(*args[:3], t, 1.5)


def test_config_defaults_depend_on_the_optimizer() -> None:
    sgd = FinetuneConfig()
    assert (sgd.epochs, sgd.lr, sgd.weight_decay, sgd.batch_size) == (0, 1e-3, 5e-4, 128)
    assert (sgd.distill, sgd.temperature, sgd.alpha, sgd.augment) == (True, 4.0, 0.9, "auto")
    adamw = FinetuneConfig(optimizer="adamw")
    assert (adamw.lr, adamw.weight_decay) == (3e-4, 0.05)
    assert FinetuneConfig(optimizer="adamw", lr=3e-4, weight_decay=0.0).lr == 3e-4
    # The resolved values round-trip, as a checkpoint's saved config must.
    assert FinetuneConfig.model_validate(adamw.model_dump()) == adamw


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"lr": 0}, "'lr': Input should be greater than 0"),
        ({"lr": -0.1}, "'lr': Input should be greater than 0"),
        ({"epochs": -1}, "'epochs': Input should be greater than or equal to 0"),
        ({"batch_size": 0}, "'batch_size': Input should be greater than or equal to 1"),
        ({"optimiser": "sgd"}, "did you mean 'optimizer'"),
    ],
)
def test_bad_settings_give_one_line_errors(settings: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        finetune_config(settings)
    assert words in str(info.value) and "\n" not in str(info.value)


def unchecked(**settings) -> FinetuneConfig:
    """A config built without validation, as code (not the CLI) might make one."""
    return FinetuneConfig.model_construct(**{**config().model_dump(), **settings})


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    student, teacher = tiny(0), tiny(1)
    cases = [
        (DataError, "labels span \\[1, 7\\] but model 'tiny' has 4 classes", {}),
        (ConfigError, "learning rate must be > 0", {"config": unchecked(lr=0.0)}),
        (ConfigError, "needs the original model as teacher", {"teacher": None}),
        (DataError, "images are 1×12×12 but model 'tiny' takes 3×12×12", {}),
    ]
    bad_labels = ArrayDataset(TRAIN.x, TRAIN.y * 2 + 1)
    bad_shape = ArrayDataset(TRAIN.x[:, :1], TRAIN.y)
    for (error, words, override), train in zip(cases, (bad_labels, TRAIN, TRAIN, bad_shape)):
        kwargs = {"teacher": teacher, "config": config(), **override}
        with pytest.raises(error, match=words) as info:
            finetune(student, kwargs["teacher"], train, SPEC, kwargs["config"], tmp_path)
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="the dataset is empty") as info:
        finetune(student, teacher, ArrayDataset(TRAIN.x[:0], TRAIN.y[:0]), SPEC, config(), tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="outputs shape \\(2, 4\\) but model 'ten' has 10"):
        finetune(
            student,
            teacher,
            TRAIN,
            dataclasses.replace(SPEC, name="ten", num_classes=10),
            config(),
            tmp_path,
        )
    assert not any(tmp_path.iterdir())  # nothing written before the checks pass


# ---- training, checkpoints and resume ------------------------------------------------------------


def test_finetune_learns_and_keeps_the_last_epoch_without_a_validation_split(
    tmp_path: Path,
) -> None:
    student, teacher = tiny(0), tiny(1)
    result = finetune(
        student, teacher, TRAIN, SPEC, config(epochs=4, distill=False), tmp_path, eval_data=EVAL
    )
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert set(result.history[0]) == {
        "epoch",
        "loss",
        "train_accuracy",
        "validation_accuracy",
        "eval_accuracy",
        "lr",
        "seconds",
    }
    assert result.history[0]["lr"] == pytest.approx(0.1)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[-1]["eval_accuracy"] >= 0.7  # reported, never used to choose
    assert result.best_epoch == 4 and result.selected_by == "last epoch"
    assert result.final_accuracy == result.history[-1]["eval_accuracy"]
    assert result.resumed_from is None and not student.training
    assert not (tmp_path / BEST_CHECKPOINT).exists()
    last = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    assert last["epoch"] == 4
    for key, value in student.state_dict().items():
        assert torch.equal(value, last["model"][key])
    assert {"model", "optimizer", "scheduler", "history", "rng", "config"} <= set(last)


def test_the_best_epoch_is_chosen_on_held_out_training_images(tmp_path: Path) -> None:
    student, teacher = tiny(0), tiny(1)
    settings = config(epochs=4, distill=False, validation=0.25)
    result = finetune(student, teacher, TRAIN, SPEC, settings, tmp_path, eval_data=EVAL)
    # The model as it came is epoch 0's candidate; a later epoch must beat it to be kept.
    held = [result.validation_before] + [row["validation_accuracy"] for row in result.history]
    assert result.best_accuracy == max(held) and result.best_epoch == held.index(max(held))
    assert result.selected_by == "validation split of 32 training images"
    best = torch.load(tmp_path / BEST_CHECKPOINT, weights_only=True)
    assert best["epoch"] == result.best_epoch
    for key, value in student.state_dict().items():
        assert torch.equal(value, best["model"][key])


def test_the_model_before_fine_tuning_is_kept_when_no_epoch_beats_it(tmp_path, capsys) -> None:
    """A teacher-matched student fine-tuned at a rate that wrecks it: every epoch scores below
    the start on the validation split, so the student leaves with the weights it came with."""
    student, teacher = tiny(1), tiny(1)
    trained = finetune(
        student, None, TRAIN, SPEC, config(epochs=4, distill=False), tmp_path / "pre"
    )
    teacher.load_state_dict(student.state_dict())
    before = {key: value.clone() for key, value in student.state_dict().items()}
    settings = config(epochs=2, lr=50.0, validation=0.25)
    result = finetune(student, teacher, TRAIN, SPEC, settings, tmp_path / "ft", eval_data=EVAL)
    assert trained.history[-1]["train_accuracy"] > 0.8 and result.validation_before > 0.8
    assert all(row["validation_accuracy"] < result.validation_before for row in result.history)
    assert result.best_epoch == 0 and result.best_accuracy == result.validation_before
    for key, value in before.items():
        assert torch.equal(value, student.state_dict()[key]), key
    assert result.final_accuracy == result.eval_before > 0.8
    out = capsys.readouterr().err
    assert f"before fine-tuning: validation {100 * result.validation_before:.2f} %" in out
    assert "no epoch beat the model before fine-tuning on the validation split" in out
    best = torch.load(tmp_path / "ft" / BEST_CHECKPOINT, weights_only=True)
    assert best["epoch"] == 0
    # The summary says which model the split chose.
    line = epoch_choice(result.to_dict())
    assert line.startswith(
        "fine-tuning: no epoch beat the model before it on the validation split of 32 training "
        f"images ({result.validation_before:.2%}; epochs "
    ) and line.endswith("at best), so that model is kept")


def test_the_evaluation_labels_influence_no_weight(tmp_path: Path) -> None:
    """Permuting --eval-data's labels changes the reported accuracy, never the weights."""
    shuffled = ArrayDataset(EVAL.x, np.random.default_rng(3).permutation(EVAL.y))
    weights = []
    for name, data in (("true", EVAL), ("shuffled", shuffled)):
        student = tiny(0)
        settings = config(epochs=3, distill=False, validation=0.25)
        finetune(student, tiny(1), TRAIN, SPEC, settings, tmp_path / name, eval_data=data)
        weights.append(student.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def _run(
    tmp_path: Path,
    name: str,
    interrupt_at: int | None = None,
    resume: bool = False,
    settings: FinetuneConfig | None = None,
):
    """A fresh student trained 3 epochs; optionally Ctrl-C at the given forward call."""
    student, teacher = tiny(0), tiny(1)
    calls = {"n": 0}

    def interrupt(*_):
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            raise KeyboardInterrupt

    handle = student.fc.register_forward_hook(interrupt)
    try:
        result = finetune(
            student,
            teacher,
            TRAIN,
            SPEC,
            settings or config(),
            tmp_path / name,
            eval_data=EVAL,
            resume=resume,
        )
    finally:
        handle.remove()
    return student, result


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    reference, reference_result = _run(tmp_path, "ref")
    # Forward calls per epoch: 8 training steps + 1 eval batch (+ 1 input probe at the start).
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "cut", interrupt_at=1 + 9 + 9 + 2)  # in epoch 3's second step
    directory = tmp_path / "cut"
    assert sorted(p.name for p in directory.iterdir()) == [LAST_CHECKPOINT]
    saved = torch.load(directory / LAST_CHECKPOINT, weights_only=True)
    assert saved["epoch"] == 2 and len(saved["history"]) == 2

    resumed, result = _run(tmp_path, "cut", resume=True)
    assert result.resumed_from == 2
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
    expected = [
        {k: v for k, v in row.items() if k != "seconds"} for row in reference_result.history
    ]
    assert strip == expected
    assert result.best_epoch == reference_result.best_epoch

    # A finished run resumed again trains nothing and keeps its result.
    again, finished = _run(tmp_path, "cut", resume=True)
    assert finished.resumed_from == 3 and len(finished.history) == 3
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in reference.state_dict().items())


def test_a_run_with_mixup_resumed_mid_epoch_replays_the_same_mixes(tmp_path: Path) -> None:
    settings = config(mixup=1.0, checkpoint_every=3)
    reference, _ = _run(tmp_path, "ref", settings=settings)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "cut", interrupt_at=1 + 9 + 5, settings=settings)  # epoch 2, step 5
    saved = torch.load(tmp_path / "cut" / LAST_CHECKPOINT, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 3)
    resumed, _ = _run(tmp_path, "cut", resume=True, settings=settings)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_interrupt_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    real_save = torch.save

    def flaky_save(payload, path, *args, **kwargs):
        if payload.get("epoch") == 2 and "optimizer" in payload:
            Path(path).write_bytes(b"PK\x03\x04 half a file")
            raise KeyboardInterrupt
        return real_save(payload, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "run")
    monkeypatch.setattr(torch, "save", real_save)
    directory = tmp_path / "run"
    assert sorted(p.name for p in directory.iterdir()) == [LAST_CHECKPOINT]
    assert torch.load(directory / LAST_CHECKPOINT, weights_only=True)["epoch"] == 1
    _, result = _run(tmp_path, "run", resume=True)
    assert result.resumed_from == 1 and len(result.history) == 3


def test_resume_checks_settings_and_starts_fresh_without_a_checkpoint(tmp_path, capsys) -> None:
    student, teacher = tiny(0), tiny(1)
    result = finetune(student, teacher, TRAIN, SPEC, config(epochs=1), tmp_path, resume=True)
    assert result.resumed_from is None and len(result.history) == 1
    assert "starts fresh" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="other settings: lr=0.1 \\(now 0.02\\)") as info:
        finetune(student, teacher, TRAIN, SPEC, config(epochs=1, lr=0.02), tmp_path, resume=True)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="other training data"):
        finetune(student, teacher, synthetic(128, 5), SPEC, config(epochs=1), tmp_path, resume=True)
    (tmp_path / LAST_CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="is unreadable"):
        finetune(student, teacher, TRAIN, SPEC, config(epochs=1), tmp_path, resume=True)


def test_train_only_decomposed_freezes_everything_else(tmp_path: Path) -> None:
    student, teacher = tiny(0), tiny(1)
    before = copy.deepcopy(student.state_dict())
    seen: list[dict[str, bool]] = []
    modes: list[bool] = []

    def record(module, *_):
        seen.append({name: p.requires_grad for name, p in student.named_parameters()})
        modes.append(student.block.training)

    handle = student.register_forward_hook(record)
    finetune(
        student,
        teacher,
        TRAIN,
        SPEC,
        config(epochs=2, train_only_decomposed=True),
        tmp_path,
        decomposed_names=["block"],
    )
    handle.remove()
    training_calls = [flags for flags, training in zip(seen, modes) if training]
    assert len(training_calls) == 16  # 2 epochs of 8 steps
    for flags in training_calls:
        assert {name for name, grad in flags.items() if grad} == {
            "block.pointwise_in.weight",
            "block.core.weight",
            "block.pointwise_out.weight",
            "block.pointwise_out.bias",
        }
    after = student.state_dict()
    for key, value in before.items():
        unchanged = torch.equal(value, after[key])
        # BatchNorm statistics outside the block are frozen too (eval mode while training).
        assert unchanged == (not key.startswith("block.")), key
    assert all(p.requires_grad for p in student.parameters())  # the caller's flags come back
    with pytest.raises(ConfigError, match="needs the names of the decomposed blocks"):
        finetune(student, teacher, TRAIN, SPEC, config(train_only_decomposed=True), tmp_path)
    with pytest.raises(ConfigError, match="'blok' is not in the model"):
        finetune(
            student,
            teacher,
            TRAIN,
            SPEC,
            config(train_only_decomposed=True),
            tmp_path,
            decomposed_names=["blok"],
        )


def test_mixup_shows_teacher_and_student_the_same_mixed_images(tmp_path: Path, capsys) -> None:
    seen: dict[float, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for concentration in (0.0, 0.5):
        student, teacher = tiny(0), tiny(1)
        inputs: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}

        def record(role, log=inputs, trained=student):
            def hook(module, args):
                if trained.training:  # training steps only, not the input probe
                    log[role].append(args[0].detach().cpu())

            return hook

        student.register_forward_pre_hook(record("student"))
        teacher.register_forward_pre_hook(record("teacher"))
        result = finetune(
            student, teacher, TRAIN, SPEC, config(epochs=1, mixup=concentration), tmp_path / "m"
        )
        seen[concentration] = list(zip(inputs["student"], inputs["teacher"], strict=True))
        # The student mostly follows a random teacher here: its label accuracy is near chance
        # (exactly 0.25 on one GPU), so only that the step trained is checked.
        assert np.isfinite(result.history[0]["loss"]) and len(inputs["student"]) == 8
        # The epoch line says what the training accuracy was scored on.
        assert ("(mixed images)" in capsys.readouterr().err) == (concentration > 0)
    assert len(seen[0.5]) == 8  # 8 steps, each seen by both models
    draws = np.random.default_rng([0, 1, 1])  # the epoch's mixup generator (seed 0, epoch 1)
    for (plain, _), (mixed, teacher_input) in zip(seen[0.0], seen[0.5], strict=True):
        assert torch.equal(mixed, teacher_input)
        share = torch.from_numpy(draws.beta(0.5, 0.5, len(plain)).astype(np.float32))
        expected = share.view(-1, 1, 1, 1) * plain + (1 - share.view(-1, 1, 1, 1)) * plain.roll(
            1, 0
        )
        torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
        assert float((mixed - plain).abs().max()) > 0.1  # the mix really changed the images


# ---- device --------------------------------------------------------------------------------------


def test_the_training_device_follows_the_setting_and_the_machine(monkeypatch) -> None:
    on_meta = nn.Linear(2, 2, device="meta")  # stands for a student already on an accelerator
    assert training_device("auto", on_meta) == torch.device("meta")
    assert training_device("cpu", on_meta) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device("auto", tiny(0)) == torch.device("cpu")
    with pytest.raises(ConfigError, match="--finetune-device cuda.*torch sees no GPU") as info:
        training_device("cuda", tiny(0))
    assert "\n" not in str(info.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert training_device("auto", tiny(0)) == torch.device("cuda", 0)
    assert training_device("cuda") == torch.device("cuda", 0)
    assert training_device("cpu", tiny(0)) == torch.device("cpu")


def test_mixed_precision_follows_the_device(monkeypatch) -> None:
    cpu = torch.device("cpu")
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(finetune_module, "native_bfloat16_cpu", lambda native=native: native)
        assert finetune_module._amp_dtype(cpu, True) is expected
        assert finetune_module._amp_dtype(cpu, False) is None


def test_bfloat16_autocast_on_a_cpu_trains_in_it_and_scores_in_float32(
    tmp_path, monkeypatch, capsys
) -> None:
    """Forced on (autocast runs on any CPU; it is the default only with AMX): the training
    passes compute in bfloat16, the input check, the epochs' scoring and the weights stay
    float32, the model still learns, and the run and its result say which precision it used."""
    monkeypatch.setattr(finetune_module, "native_bfloat16_cpu", lambda: True)
    student = tiny(0)
    dtypes: dict[bool, set] = {True: set(), False: set()}
    student.block.register_forward_hook(lambda m, a, out: dtypes[m.training].add(out.dtype))
    settings = config(epochs=4, distill=False)
    result = finetune(student, None, TRAIN, SPEC, settings, tmp_path / "bf16", eval_data=EVAL)
    assert dtypes == {True: {torch.bfloat16}, False: {torch.float32}}
    assert result.precision == "bfloat16 autocast"
    assert "fine-tuning on cpu, bfloat16 autocast" in capsys.readouterr().err
    assert all(
        p.dtype == torch.float32 for p in student.state_dict().values() if p.is_floating_point()
    )
    assert result.history[-1]["eval_accuracy"] >= 0.7
    off = finetune(
        tiny(0), None, TRAIN, SPEC, config(epochs=1, amp=False, distill=False), tmp_path / "off"
    )
    assert off.precision == "float32"


def test_both_models_train_on_the_chosen_device_and_come_back(tmp_path: Path, capsys) -> None:
    student, teacher = tiny(0), tiny(1)
    seen: dict[str, set[str]] = {"student": set(), "teacher": set()}
    for name, module in (("student", student), ("teacher", teacher)):
        module.fc.register_forward_pre_hook(
            lambda _, args, name=name: seen[name].add(args[0].device.type)
        )
    settings = config(epochs=3, alpha=0.0)  # the teacher still runs, its term weighs nothing
    result = finetune(student, teacher, TRAIN, SPEC, settings, tmp_path, eval_data=EVAL)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert result.device.split(":")[0].split(" ")[0] == expected
    assert f"fine-tuning on {result.device}" in capsys.readouterr().err
    assert expected in seen["student"] and seen["teacher"] == {expected}
    for module in (student, teacher):
        assert {p.device.type for p in module.parameters()} == {"cpu"}
        assert {b.device.type for b in module.buffers()} == {"cpu"}
    assert result.history[-1]["eval_accuracy"] >= 0.7
    # The checkpoint holds CPU tensors only: written on a GPU, it loads on any machine.
    saved = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    momentum = [state["momentum_buffer"] for state in saved["optimizer"]["state"].values()]
    assert len(momentum) == len(list(student.parameters()))
    assert {t.device.type for t in [*saved["model"].values(), *momentum]} == {"cpu"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA keeps the models' layout")
def test_on_a_cpu_both_models_train_channels_last_and_come_back_contiguous(tmp_path: Path) -> None:
    """oneDNN's convs run faster on channels-last tensors: the student's and the teacher's
    conv weights and the image batches take that layout while fine-tuning on a CPU (the epochs'
    scoring too), and the models come back as they were."""
    student, teacher = tiny(0), tiny(1)
    seen: dict[str, list[tuple[int, bool]]] = {"student": [], "teacher": []}
    for name, module in (("student", student), ("teacher", teacher)):
        module.conv1.register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(
                (
                    len(args[0]),
                    args[0].is_contiguous(memory_format=torch.channels_last)
                    and m.weight.is_contiguous(memory_format=torch.channels_last),
                )
            )
        )
    settings = config(alpha=0.0)  # the random teacher runs, its term weighs nothing
    result = finetune(student, teacher, TRAIN, SPEC, settings, tmp_path, eval_data=EVAL)
    # The input check's two images run first, before the run moves the models.
    assert seen["student"][0] == (2, False)
    assert {last for _, last in seen["student"][1:]} == {True}
    assert len(seen["student"]) > 3 * len(TRAIN) // 16  # every step and every scoring batch
    assert {last for _, last in seen["teacher"]} == {True}
    for module in (student, teacher):
        assert all(p.is_contiguous() for p in module.parameters())
    assert result.history[-1]["eval_accuracy"] >= 0.7
    # The checkpoint loads into a model of either layout.
    saved = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    tiny(2).load_state_dict(saved["model"])


def test_zero_epochs_is_a_no_op(tmp_path: Path) -> None:
    student = tiny(0)
    before = copy.deepcopy(student.state_dict())
    result = finetune(student, None, TRAIN, SPEC, FinetuneConfig(), tmp_path / "never")
    assert result.history == [] and result.best_epoch is None
    assert not (tmp_path / "never").exists()
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_plot_history_writes_a_png(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "loss": 1.0, "train_accuracy": 0.5, "eval_accuracy": 0.6, "lr": 0.01},
        {"epoch": 2, "loss": 0.5, "train_accuracy": 0.7, "eval_accuracy": 0.8, "lr": 0.005},
    ]
    path = plot_history(history, tmp_path / "curve.png", "test", {"original": 0.9})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    unevaluated = [{**row, "eval_accuracy": None} for row in history]
    assert plot_history(unevaluated, tmp_path / "train_only.png", "t").stat().st_size > 5000


# ---- recovery on real (bundled) data -------------------------------------------------------------


@pytest.mark.slow
def test_finetuning_recovers_digits_accuracy(tmp_path: Path) -> None:
    from rankfold.models import DIGITS_SPEC, batches, digits_splits, train_digits_cnn
    from rankfold.passes import RankPolicy, analyze, decompose, trace
    from rankfold.runtime import torch_accuracy

    train, test = digits_splits(0)
    model = train_digits_cnn(seed=0)
    original = trace(model, torch.zeros(1, *DIGITS_SPEC.input_shape))
    analysis = analyze(original)
    plan = plan_of(analysis, RankPolicy(method="tucker2", macs_reduction=2.0), "digits-cnn")
    compressed, _ = decompose(original, analysis, plan)
    accuracy = {"original": torch_accuracy(original, batches(test, DIGITS_SPEC))}
    accuracy["decomposed"] = torch_accuracy(compressed, batches(test, DIGITS_SPEC))
    assert accuracy["decomposed"] < accuracy["original"] - 0.05

    result = finetune(
        compressed,
        original,
        train,
        DIGITS_SPEC,
        FinetuneConfig(epochs=3),
        tmp_path,
        eval_data=test,
        decomposed_names=[entry.name for entry in plan.decomposed()],
    )
    accuracy["finetuned"] = torch_accuracy(compressed, batches(test, DIGITS_SPEC))
    # The last epoch's score, in float32 on the training device: on the CPU the same number; on
    # CUDA, whose convs round differently (TF32), at most one image apart.
    one_image = 1 / len(test) if result.device.startswith("cuda") else 1e-9
    assert abs(accuracy["finetuned"] - result.final_accuracy) <= one_image
    # Within 3 pt (11 of 360 images) of the original, from a 50 % start: the trained weights,
    # hence the last image or two, differ between CPUs (AVX-512 vs AVX2 kernels).
    assert accuracy["finetuned"] >= accuracy["original"] - 0.03, accuracy
