"""One config tree: every compress flag is one config path and back, --print-config round-trips,
presets sit below the file and the options, one seed, and --help loads no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from rankfold.converter.cli import app
from rankfold.converter.config import BUDGETS, CompressConfig, build_config, load_config_file
from rankfold.converter.options import OPTIONS, Option
from rankfold.converter.presets import PRESETS
from rankfold.passes.selectors import get_selector

runner = CliRunner()
ARGUMENTS = {"model"}  # config paths set by a positional argument, not a flag


def invoke(*args: Any):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    return lines[0]


def leaf_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of the settings in `model`; a dict of sub-models (ranks.layers) is one leaf."""
    paths = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= leaf_paths(annotation, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return paths


def at(data: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def printed(*args: Any) -> dict[str, Any]:
    result = invoke("compress", *args, "--print-config", "-")
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)


def test_every_flag_has_one_config_path_and_every_path_a_flag():
    paths = [option.path for option in OPTIONS]
    assert len(paths) == len(set(paths))
    assert len({option.name for option in OPTIONS}) == len(OPTIONS)
    assert set(paths) | ARGUMENTS == leaf_paths(CompressConfig)


# A non-default value for each flag whose type does not give one (see `sample`): the text given
# and the config value (as --print-config writes it) it must set.
SAMPLES: dict[str, tuple[list[str], Any]] = {
    "input_shape": (["3,8,8"], [3, 8, 8]),
    "mean": (["0.5,0.4,0.3"], [0.5, 0.4, 0.3]),
    "std": (["0.2,0.25,0.3"], [0.2, 0.25, 0.3]),
    "data.crop_ratio": (["0.9"], 0.9),
    "leaf_modules": (["a", "b"], ["a", "b"]),
    "ranks.method": (["cp"], "cp"),
    "ranks.rank": (["0.25"], 0.25),
    "ranks.layers": (["conv1=8", "fc=4,2"], {"conv1": {"rank": 8}, "fc": {"rank": [4, 2]}}),
    "ranks.skip": (["Linear"], ["Linear"]),
    "ranks.macs_reduction": (["1.5"], 1.5),
    "ranks.params_reduction": (["1.5"], 1.5),
    "ranks.latency_reduction": (["1.5"], 1.5),
    "ranks.round_to": (["16"], 16),
    "ranks.min_macs_share": (["0.01"], 0.01),
    "ranks.select": (["energy"], "energy"),
    "ranks.energy": (["0.9"], 0.9),
    "ranks.rel_error": (["0.2"], 0.2),
    "ranks.epsilon": (["0.02"], 0.02),
    "search.sampler": (["tpe"], "tpe"),
    "search.proxy": (["kd"], "kd"),
    "search.storage": (["sqlite:///s.db"], "sqlite:///s.db"),
    "search.study_name": (["s"], "s"),
    "search.timeout": (["60"], 60.0),
    "finetune.lr": (["0.05"], 0.05),
    "finetune.optimizer": (["adamw"], "adamw"),
    "finetune.momentum": (["0.8"], 0.8),
    "finetune.weight_decay": (["0.001"], 0.001),
    "finetune.temperature": (["2"], 2.0),
    "finetune.alpha": (["0.5"], 0.5),
    "finetune.mixup": (["0.4"], 0.4),
    "finetune.augment": (["none"], "none"),
    "finetune.device": (["cpu"], "cpu"),
    "finetune.validation": (["0.1"], 0.1),
    "export.atol": (["0.001"], 0.001),
    "export.rtol": (["0.001"], 0.001),
    "latency.provider": (["cuda"], "cuda"),
    "latency.batch": (["1,8"], [1, 8]),
    "latency.threads": (["1,2"], [1, 2]),
    "latency.gate_margin": (["0.1"], 0.1),
    "latency.gate_efficiency": (["0.9"], 0.9),
    "quantize.dtype": (["int8"], "int8"),
    "quantize.float_layers": (["conv1", "layer4.*"], ["conv1", "layer4.*"]),
    "quantize.calibration": (["entropy"], "entropy"),
    "quantize.min_agreement": (["0.9"], 0.9),
    "quantize.max_float_share": (["0.5"], 0.5),
    "statistics.damping": (["0.1"], 0.1),
}
# Other settings a sample changes on purpose.
ALSO = {
    "ranks.rel_error": (["--select", "error"], {"ranks.select"}),
    "ranks.energy": (["--select", "energy"], {"ranks.select"}),
    "ranks.select": ([], {"ranks.energy"}),  # printed where it is read: energy, no budget
    # Settings read by the fine-tuning alone need it to run.
    **{
        f"finetune.{key}": (["--finetune-epochs", "1"], {"finetune.epochs"})
        for key in (
            "lr",
            "batch_size",
            "momentum",
            "weight_decay",
            "distill",
            "temperature",
            "alpha",
            "mixup",
            "train_only_decomposed",
            "amp",
            "eval_batch_size",
            "checkpoint_every",
            "validation",
        )
    },
    # AdamW's own rate and decay: printed unset, as SGD's were.
    "finetune.optimizer": (["--finetune-epochs", "1"], {"finetune.epochs"}),
    # INT8 calibrates on the training images.
    "quantize.dtype": (["--train-data", "some/file"], {"train_data"}),
    # The refit's steps are read only with training data (the refit is on by default).
    "refit_steps": (["--train-data", "t.npz"], {"train_data"}),
    "refit_segment_steps": (["--train-data", "t.npz"], {"train_data"}),
    "refit_memory_mb": (["--train-data", "t.npz"], {"train_data"}),
    "recalibrate_samples": (["--train-data", "t.npz"], {"train_data"}),
    # Settings of data-aware fits are read only with training data and --data-aware.
    **{
        f"statistics.{key}": (
            ["--train-data", "t.npz", "--data-aware"],
            {"train_data", "statistics.data_aware"},
        )
        for key in ("samples", "damping", "memory_mb")
    },
    # A budget turns the latency gate on while latency is measured (the default): printed
    # unset, as without the budget.
    **{f"ranks.{b}": ([], set()) for b in BUDGETS},
    # Settings read only when what reads them runs (`CompressConfig._unread_settings`).
    "ranks.round_to": (["--macs-reduction", "2"], {"ranks.macs_reduction"}),
    "eval_limit": (["--eval-data", "e.npz"], {"eval_data"}),
    "train_limit": (["--train-data", "t.npz"], {"train_data"}),
    **{
        f"data.{key}": (["--eval-data", "e.npz"], {"eval_data"})
        for key in ("crop_ratio", "workers", "skip_bad_images")
    },
    "statistics.data_aware": (["--train-data", "t.npz"], {"train_data"}),
    "finetune.device": (["--train-data", "t.npz"], {"train_data"}),
    "resume": (["--finetune-epochs", "1"], {"finetune.epochs"}),
    **{
        f"quantize.{key}": (
            ["--quantize", "int8", "--train-data", "t.npz"],
            {"quantize.dtype", "train_data"},
        )
        for key in (
            "float_layers",
            "max_float_share",
            "calibration",
            "samples",
            "equalize",
            "min_agreement",
            "reduce_range",
            "stem_output",
        )
    },
    **{path: (["--select", "pars"], {"ranks.select"}) for path in get_selector("pars").reads},
    "ranks.epsilon": (["--select", "eps-search"], {"ranks.select"}),
    **{
        f"latency.{key}": (["--latency-gate"], {"latency.gate"})
        for key in ("gate_margin", "gate_efficiency", "cache_dir")
    },
    "latency.calibrate": (["--latency-reduction", "2"], {"ranks.latency_reduction"}),
}


def sample(option: Option, default: Any) -> tuple[list[str], Any]:
    if option.kind is bool:
        return [f"--{'no-' if default else ''}{option.name[2:]}"], not default
    if option.kind is int:
        return [option.name, str((default or 0) + 1)], (default or 0) + 1
    if option.kind is Path:
        return [option.name, "some/file"], "some/file"
    texts, expected = SAMPLES[option.path]
    return [arg for text in texts for arg in (option.name, text)], expected


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_each_flag_sets_its_path_and_nothing_else(option):
    paths = leaf_paths(CompressConfig)
    defaults = printed("m")
    args, expected = sample(option, at(defaults, option.path))
    extra, also = ALSO.get(option.path, ([], set()))
    config = printed("m", *args, *extra)
    value = at(config, option.path)
    if option.path == "ranks.layers":  # the file's shape fills the other per-layer keys
        value = {k: {f: v for f, v in d.items() if v is not None} for k, d in value.items()}
    assert value == expected
    changed = {path for path in paths if at(config, path) != at(defaults, path)}
    assert changed == {option.path} | also


def test_print_config_round_trips(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    args = ["resnet20", "--method", "cp", "--latency-reduction", "2", "--layer-rank", "conv1=4"]
    assert invoke("compress", *args, "--seed", "7", "--print-config", first).exit_code == 0
    config = build_config(load_config_file(first))
    assert config.seed == 7 and config.ranks.layers["conv1"].rank == 4
    # No MODEL: the file names it; the file's config is written back unchanged.
    assert invoke("compress", "--config", first, "--print-config", second).exit_code == 0
    assert build_config(load_config_file(second)).model_dump() == config.model_dump()
    assert second.read_text() == first.read_text()


def test_error_selector_round_trips_its_bound(tmp_path):
    path = tmp_path / "run.yaml"
    assert (
        invoke(
            "compress", "m", "--select", "error", "--rel-error", "0.2", "--print-config", path
        ).exit_code
        == 0
    )
    assert build_config(load_config_file(path)).ranks.rel_error == 0.2


def test_presets_sit_below_the_file_and_the_options(tmp_path):
    fast = PRESETS["fast"][1]
    assert build_config(printed("m", "--preset", "fast")).latency.gate is True
    assert fast["latency"]["gate"] is True
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nranks: {macs_reduction: 3}\nlatency: {gate: false}\n")
    config = printed("--preset", "fast", "--config", path)
    assert config["ranks"]["macs_reduction"] == 3 and config["latency"]["gate"] is False
    assert config["ranks"]["select"] == "uniform"  # from the preset
    config = printed("--preset", "fast", "--config", path, "--macs-reduction", "4")
    assert config["ranks"]["macs_reduction"] == 4
    # A budget replaces the lower layers' budget rather than adding a second one.
    config = printed("m", "--preset", "small", "--latency-reduction", "2")
    assert config["ranks"]["params_reduction"] is None
    assert config["ranks"]["latency_reduction"] == 2


def test_unknown_preset_suggests_the_closest():
    assert "did you mean 'fast'?" in error_line(invoke("compress", "m", "--preset", "fsat"))


def test_rel_error_without_the_error_selector_is_one_line_in_cli_and_file(tmp_path):
    line = error_line(invoke("compress", "m", "--rel-error", "0.2", "--print-config", "-"))
    assert "--rel-error" in line and "add --select error or drop --rel-error" in line
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nranks: {rel_error: 0.2, select: energy}\n")
    line = error_line(invoke("compress", "--config", path, "--print-config", "-"))
    assert "not --select energy" in line


def test_energy_where_it_is_not_read_is_one_line_in_cli_and_file(tmp_path):
    line = error_line(invoke("compress", "m", "--energy", "0.9", "--print-config", "-"))
    assert "not --select uniform; add --select energy or drop --energy" in line
    budget = ["--macs-reduction", "2", "--method", "tucker2"]  # energy, by default or named
    for named in ([], ["--select", "energy"]):
        line = error_line(invoke("compress", "m", *budget, *named, "--energy", "0.9"))
        assert "under a budget the threshold is found by bisection" in line
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nranks: {energy: 0.9, select: energy}\n")
    assert "energy: 0.9" in invoke("compress", "--config", path, "--print-config", "-").output


@pytest.mark.parametrize("section", ["search", "finetune"])
def test_one_seed_old_seed_keys_point_to_it(tmp_path, section):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: m\n{section}: {{seed: 1}}\n")
    line = error_line(invoke("compress", "--config", path, "--print-config", "-"))
    assert f"'{section}.seed' — it moved to 'seed'" in line


def test_compress_without_a_model_is_one_line():
    assert "give MODEL" in error_line(invoke("compress", "--print-config", "-"))


@pytest.mark.parametrize(
    "command", [[], ["compress"], ["analyze"], ["validate"], ["bench"], ["methods"], ["demo"]]
)
def test_help_imports_no_torch(command):
    code = (
        "import sys\n"
        "from rankfold.converter.cli import app\n"
        f"try:\n    app({[*command, '--help']!r})\n"
        "except SystemExit as exit:\n    assert exit.code == 0\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'matplotlib') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines()[-1] == "[]"


def test_a_printed_config_leaves_defaults_that_follow_other_settings_unset(tmp_path):
    """Read back with another optimizer or latency setting, a file gets that one's defaults,
    as the same options without the file would."""
    path = tmp_path / "run.yaml"
    args = ["m", "--macs-reduction", "2", "--finetune-epochs", "1", "--no-latency"]
    assert invoke("compress", *args, "--print-config", path).exit_code == 0
    written = load_config_file(path)
    assert written["finetune"]["lr"] is None and written["latency"]["gate"] is None
    for extra in (["--optimizer", "adamw"], ["--latency"]):
        with_file = printed("--config", path, *extra)
        without = printed(*args, *extra)
        assert with_file == without
        assert with_file["finetune"]["lr"] is None and with_file["latency"]["gate"] is None
    resolved = build_config(printed("--config", path, "--optimizer", "adamw", "--latency"))
    assert (resolved.finetune.lr, resolved.finetune.weight_decay) == (3e-4, 0.05)
    assert resolved.latency.gate is True
    # A value set apart from the default is kept as set.
    assert printed(*args, "--lr", "0.05")["finetune"]["lr"] == 0.05


def test_print_config_to_a_pipe_writes_into_it_and_leaves_it_a_pipe(tmp_path):
    """A rename over /dev/null or a FIFO would replace the device with a regular file."""
    import os
    import stat
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()), daemon=True)
    reader.start()
    assert invoke("compress", "m", "--seed", "3", "--print-config", fifo).exit_code == 0
    reader.join(timeout=30)
    assert read and yaml.safe_load(read[0])["seed"] == 3
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_legitimate_combinations_are_not_refused(tmp_path):
    """What reads a setting in these runs: the latency budget's calibration times its plans
    (--repeats) without --no-latency's measurement; a preset's budget and gate give way to a
    global rank or a plan typed above it; a --plan run's printed config replays."""
    assert (
        printed("m", "--latency-reduction", "1.5", "--no-latency", "--repeats", "5")["latency"][
            "repeats"
        ]
        == 5
    )
    ranked = printed("m", "--preset", "fast", "--rank", "0.5")
    assert ranked["ranks"]["rank"] == 0.5 and ranked["ranks"]["macs_reduction"] is None
    budget = tmp_path / "budget.yaml"
    budget.write_text("ranks:\n  method: cp\n  macs_reduction: 2\n")
    ranked = printed("m", "--config", budget, "--rank", "8")
    assert ranked["ranks"]["rank"] == 8 and ranked["ranks"]["macs_reduction"] is None
    planned = printed("m", "--preset", "fast", "--plan", "p.json")
    assert planned["ranks"]["select"] is None and planned["latency"]["gate"] is None
    path = tmp_path / "run.yaml"
    assert invoke("compress", "m", "--plan", "p.json", "--print-config", path).exit_code == 0
    assert printed("--config", path)["plan"] == "p.json"
