"""Typed, strict configuration: unknown keys are errors with a did-you-mean; YAML/JSON files.

The CLI only fills a `CompressConfig` and hands it to the pipeline; every option has one path in
it (converter/options.py), so a YAML file can hold the same settings. Layers merge lowest first:
preset < config file (`--config run.yaml`) < command-line options.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rankfold.converter.finetune import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, FinetuneConfig
from rankfold.converter.options import OPTIONS
from rankfold.converter.strict import config_error
from rankfold.passes.core import ConfigError, ProviderError
from rankfold.passes.correction import DEFAULT_REFINE_STEPS
from rankfold.passes.plan import RankPolicy
from rankfold.passes.search import SearchConfig, redacted
from rankfold.passes.selectors import SELECTORS, get_selector
from rankfold.runtime.backends import get_backend


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExportConfig(_Strict):
    opset: int = Field(default=18, ge=18)  # torch's ONNX exporter emits opset 18 and later
    atol: float = Field(default=1e-4, gt=0)
    # Relative to the largest output magnitude: float32 rounding grows with the logits' scale.
    rtol: float = Field(default=1e-5, ge=0)
    parity_samples: int = Field(default=64, ge=1)
    # Fold BatchNorm, merge adjacent 1×1 convs and drop identities before export
    # (rankfold.passes.cleanup); parity is still checked against the uncleaned model.
    cleanup: bool = True


class LatencyConfig(_Strict):
    enabled: bool = True
    provider: str = "cpu"  # a name in rankfold.runtime.BACKENDS
    batch: list[int] = Field(default_factory=lambda: [1])
    warmup: int = Field(default=5, ge=0)
    repeats: int = Field(default=30, ge=1)
    # The intra-op thread counts the model is deployed with (None: onnxruntime's default, all
    # cores): the factorized model's many small ops scale worse with threads than the original,
    # so a speedup at one count says little about another. Validation times every count, the
    # gate plans for every count, a latency budget is planned at the first.
    threads: list[int] | None = None
    # Latency gate: after planning, measure every planned block against its layer at each batch
    # size (per-layer table, cached per machine and provider) and keep the layer whole unless
    # the block is `gate_margin` faster; with round_to, ranks first move to the multiple when
    # that measures faster. None: on when latency is measured and the ranks have a budget.
    gate: bool | None = None
    gate_margin: float = Field(default=0.05, ge=0, lt=1)
    # Also revert blocks whose speedup is below this share of their MAC reduction (0: off).
    gate_efficiency: float = Field(default=0.0, ge=0, le=1)
    cache_dir: Path | None = None  # the latency table's cache (default ~/.cache/rankfold/latency)
    # --latency-reduction: re-plans after timing the whole exported model at the first batch size
    # (the per-layer table misses per-node and between-layer costs); 0 trusts the table.
    calibrate: int = Field(default=2, ge=0, le=10)
    # A compressed model measurably slower than the original at any batch size and thread
    # count fails the run (exit code 1 after the report is written): for CI.
    fail_if_slower: bool = False

    @field_validator("threads", mode="before")
    @classmethod
    def _thread_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @field_validator("threads")
    @classmethod
    def _positive_threads(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError("thread counts must be integers ≥ 1")
        return value

    @property
    def thread_counts(self) -> list[int | None]:
        """The counts to time at: `threads`, or [None] (onnxruntime's default, all cores)."""
        return list(self.threads) if self.threads else [None]

    @field_validator("provider")
    @classmethod
    def _registered(cls, value: str) -> str:
        try:
            return get_backend(value).name
        except ProviderError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("batch")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(b < 1 for b in value):
            raise ValueError("batch sizes must be integers ≥ 1")
        return value


class DataConfig(_Strict):
    """How --train-data and --eval-data are read (see rankfold.models.data)."""

    crop_ratio: float = Field(default=0.875, gt=0, le=1)
    workers: int | None = Field(default=None, ge=0)  # None: up to 4, one core left free
    skip_bad_images: bool = False


class QuantizeConfig(_Strict):
    """Static INT8 quantization of model.onnx and original.onnx (rankfold.runtime.quantize)."""

    dtype: Literal["int8"] | None = None  # None: float only
    # Layers kept in float: names, globs or parents; "auto" stands for the first conv and the
    # last linear layer, "sensitive" for the layers that lose most SQNR, kept float one at a
    # time until top-1 agreement reaches min_agreement on held-out training images (see
    # rankfold.converter.quantization).
    float_layers: list[str] = Field(default_factory=lambda: ["auto", "sensitive"])
    # "sensitive" stops before the float layers would hold more than this share of the model's
    # conv/linear MACs.
    max_float_share: float = Field(default=0.25, gt=0, le=1)
    # auto: min/max and percentile ranges both calibrated, the file closer to the float one on
    # held-out training images kept (rankfold.converter.quantization)
    calibration: Literal["auto", "minmax", "entropy", "percentile"] = "auto"
    samples: int = Field(default=256, ge=1)  # training images the ranges are calibrated on
    # Rescale the channels between factorized stages before calibrating (exact in float).
    equalize: bool = True
    # The stated tolerance: a quantized file must predict the float file's class on at least
    # this share of the evaluation images (or of the calibration images without eval data).
    min_agreement: float = Field(default=0.97, ge=0, le=1)
    # Weights in 7 bits, for CPUs whose int8 kernels saturate (x86 without VNNI); None: decided
    # by the CPU that quantizes (rankfold.runtime.quantize.int8_dot_saturates).
    reduce_range: bool | None = None
    # Of a factorized first conv kept float by "auto", quantize the last stage: it reads the
    # block's own activations, not the image; faster, at an accuracy cost that is model-dependent.
    stem_output: bool = False

    @field_validator("float_layers")
    @classmethod
    def _none_alone(cls, value: list[str]) -> list[str]:
        if "none" not in value:
            return value
        if len(value) > 1:
            raise ValueError("'none' keeps no layer in float; give it alone or drop it")
        return []

    @model_validator(mode="after")
    def _stem_output_needs_auto(self) -> QuantizeConfig:
        if self.stem_output and "auto" not in self.float_layers:
            raise ConfigError(
                "--quant-stem-output quantizes the last stage of a factorized first conv that "
                "'auto' keeps float, and --float-layers has no 'auto'; add it or drop the option"
            )
        return self

    @model_validator(mode="after")
    def _cap_needs_the_search(self) -> QuantizeConfig:
        # A cap other than the default (a printed config holds the default; it binds nothing).
        default = type(self).model_fields["max_float_share"].default
        if self.max_float_share != default and "sensitive" not in self.float_layers:
            raise ConfigError(
                "--max-float-share caps the layers 'sensitive' keeps float, and --float-layers "
                "has no 'sensitive'; add it (--float-layers sensitive) or drop the cap"
            )
        return self


DEFAULT_REFIT_MEMORY_MB = 4096


class StatisticsConfig(_Strict):
    """Data-aware fits (`data_aware`, with training data): each layer is fitted to its output
    on the first `samples` training images (their input second moments) instead of to its
    weights. Off by default: followed by the last-stage refit and BatchNorm recalibration it
    does not beat the weight-only fit followed by the same (BENCHMARKS.md, issue #20)."""

    data_aware: bool = False
    samples: int = Field(default=1024, ge=1)  # also the images `refit` reads
    damping: float = Field(default=0.01, ge=0)  # Σ + damping·tr(Σ)/n·I is fitted
    memory_mb: int = Field(default=512, ge=1)  # the statistics pass's own memory


class CompressConfig(_Strict):
    """Everything one `rankfold compress` run needs."""

    model: str
    weights: Path | None = None
    input_shape: tuple[int, int, int] | None = None
    # The model's input normalisation, replacing its spec's (a bare factory has 0 and 1).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    leaf_modules: list[str] = Field(default_factory=list)
    ranks: RankPolicy = Field(default_factory=RankPolicy)
    search: SearchConfig = Field(default_factory=SearchConfig)
    plan: Path | None = None
    eval_data: Path | None = None
    eval_limit: int | None = Field(default=None, ge=1)
    train_data: Path | None = None
    train_limit: int | None = Field(default=None, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    # With train_data: the sequential correction (each block's last stage refitted, in graph
    # order, to the original layer's outputs on the first statistics.samples images, fed the
    # compressed network's activations), then BatchNorm recalibration (or bias correction for
    # BN-free models).
    refit: bool = True
    # Then every block's stages together: Adam steps on the same outputs (0: least squares only).
    refit_steps: int = Field(default=DEFAULT_REFINE_STEPS, ge=0)
    # Then each segment's blocks together, on the segment's output (a residual unit through its
    # ReLU; the last block through the output): Adam steps, 0 turns it off. None: as many as
    # refit_steps where a planned method asks for it (Method.refines_segments: tucker2,
    # tucker2-cp), else 0.
    refit_segment_steps: int | None = Field(default=None, ge=0)
    # Activations the refit (both networks) and bias correction hold, for all their images at
    # once: fewer images are read where more would not fit (224² models, about 10 MiB an image).
    refit_memory_mb: int = Field(default=DEFAULT_REFIT_MEMORY_MB, ge=1)
    recalibrate: bool = True
    # Training images BatchNorm is re-estimated on: the first ones (an ImageFolder's cover every
    # class), enough for the statistics and minutes, not hours, on an ImageNet-size folder; more
    # than CIFAR's 5,085-image sets.
    recalibrate_samples: int = Field(default=8192, ge=1)
    statistics: StatisticsConfig = Field(default_factory=StatisticsConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    resume: bool = False
    export: ExportConfig = Field(default_factory=ExportConfig)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    # the only seed: factorizations, the search's sampler, fine-tuning, random weights
    seed: int = 0

    @model_validator(mode="after")
    def _gate_by_default(self) -> CompressConfig:
        # A budget without the gate plans MACs that onnxruntime may not turn into speed
        # (ResNet-56 CP at 3×: 1.12× faster without it, 2.42× with it).
        if self.latency.gate is None:
            self.latency.gate = self.gate_default
        return self

    @property
    def gate_default(self) -> bool:
        """The latency gate unless set: on where latency is measured and a budget plans."""
        return bool(self.latency.enabled and self.ranks.budgeted and self.plan is None)

    @model_validator(mode="after")
    def _quantization_needs_calibration_images(self) -> CompressConfig:
        if self.quantize.dtype is not None and self.train_data is None:
            raise ConfigError(
                "--quantize int8 calibrates activation ranges on training images; pass "
                "--train-data (an .npz or ImageFolder)"
            )
        return self

    @model_validator(mode="after")
    def _output_selector_needs_training_images(self) -> CompressConfig:
        if self.ranks.selector == "output" and self.train_data is None and self.plan is None:
            raise ConfigError(
                "--select output weighs every layer's error by its input statistics on "
                "training images; pass --train-data (an .npz or ImageFolder)"
            )
        return self

    @model_validator(mode="after")
    def _energy_is_read_without_a_budget(self) -> CompressConfig:
        if "energy" in self.ranks.model_fields_set and not self.ranks.reads_energy:
            why = (
                "under a budget the threshold is found by bisection; drop --energy or the budget"
                if self.ranks.selector == "energy"
                else f"not --select {self.ranks.selector}; add --select energy or drop --energy"
            )
            raise ConfigError(
                f"--energy (ranks.energy) is read by --select energy without a budget only, {why}"
            )
        return self

    @model_validator(mode="after")
    def _rel_error_needs_its_selector(self) -> CompressConfig:
        # Only a bound the user gave: the default is harmless under any selector.
        if "rel_error" in self.ranks.model_fields_set and self.ranks.selector != "error":
            raise ConfigError(
                f"--rel-error (ranks.rel_error) is read by --select error only, not --select "
                f"{self.ranks.selector}; add --select error or drop --rel-error"
            )
        return self

    @model_validator(mode="after")
    def _refit_steps_need_the_refit(self) -> CompressConfig:
        for key in ("refit_steps", "refit_segment_steps"):
            flag = "--" + key.replace("_", "-")
            if getattr(self, key) != type(self).model_fields[key].default and not self.refits:
                why = "--refit" if self.train_data else "--train-data"
                raise ConfigError(
                    f"{flag} ({key}) is read by the refit, which needs {why}; add it or drop {flag}"
                )
        return self

    @model_validator(mode="after")
    def _refit_memory_needs_a_pass(self) -> CompressConfig:
        if self.refit_memory_mb != DEFAULT_REFIT_MEMORY_MB and not (
            self.train_data and (self.refit or self.recalibrate)
        ):
            why = "--refit or --recalibrate" if self.train_data else "--train-data"
            raise ConfigError(
                "--refit-memory-mb (refit_memory_mb) is read by the refit and bias correction, "
                f"which need {why}; add it or drop --refit-memory-mb"
            )
        return self

    @model_validator(mode="after")
    def _finetune_settings_need_epochs(self) -> CompressConfig:
        # Settings read by the fine-tuning alone (augment and device are read by recalibration
        # and the refit too, amp by the refit's steps); a written-out config restates their
        # defaults, which is no request.
        settings = self.finetune
        if settings.epochs > 0:
            return self
        refit_steps = self.refits and (self.refit_steps > 0 or bool(self.refit_segment_steps))
        shared = {"epochs", "augment", "device"} | ({"amp"} if refit_steps else set())
        # The rate and decay default by optimizer: compared with the chosen optimizer's.
        plain, by_optimizer = FinetuneConfig(), FinetuneConfig(optimizer=settings.optimizer)
        for key in sorted(settings.model_fields_set - shared):
            defaults = by_optimizer if key in ("lr", "weight_decay") else plain
            if getattr(settings, key) != getattr(defaults, key):
                name = key.replace("_", "-")
                flag = (
                    f"--{name}/--no-{name}"
                    if isinstance(getattr(defaults, key), bool)
                    else f"--{name}"
                )
                readers = (
                    "the fine-tuning and the refit's Adam steps, which run with --finetune-epochs "
                    "N or with --train-data and --refit-steps above 0; add one"
                    if key == "amp"
                    else "the fine-tuning, which runs with --finetune-epochs N; add it"
                )
                raise ConfigError(f"{flag} (finetune.{key}) is read by {readers} or drop {flag}")
        return self

    @model_validator(mode="after")
    def _plan_fixes_the_ranks(self) -> CompressConfig:
        # By value: a written-out config of a --plan run restates the rank defaults.
        if self.plan is None:
            return self
        defaults = RankPolicy()
        given = sorted(
            name
            for name in type(self.ranks).model_fields
            if name != "round_to" and getattr(self.ranks, name) != getattr(defaults, name)
        )
        if given:
            raise ConfigError(
                f"--plan replays {self.plan}, which fixes every layer's method and ranks; drop "
                f"the rank settings ({', '.join('ranks.' + name for name in given)})"
            )
        return self

    @model_validator(mode="after")
    def _settings_this_run_reads(self) -> CompressConfig:
        # A value other than the default that nothing in this run reads would look like a
        # request the run honoured (a written-out config restates the defaults: no request).
        for path, reader, remedy in self._unread_settings():
            node, *parents = self, *path.split(".")[:-1]
            for part in parents:
                node = getattr(node, part)
            key = path.rsplit(".", 1)[-1]
            default = type(node).model_fields[key].get_default(call_default_factory=True)
            if path == "latency.gate":  # resolved by `_gate_by_default` already
                default = self.gate_default
            if getattr(node, key) != default:
                flag = FLAGS.get(path, path)
                raise ConfigError(f"{flag} ({path}) is read by {reader}; {remedy} or drop {flag}")
        return self

    def _unread_settings(self) -> Iterator[tuple[str, str, str]]:
        """(config path, who would read it, how to make it read) of the settings this run
        leaves unread."""
        latency, ranks = self.latency, self.ranks
        budget = "--macs-reduction, --params-reduction or --latency-reduction"
        rules: list[tuple[tuple[str, ...], str, str, bool]] = [
            (
                tuple(f"quantize.{key}" for key in QuantizeConfig.model_fields if key != "dtype"),
                "INT8 quantization",
                "add --quantize int8",
                self.quantize.dtype is not None,
            ),
            (
                ("latency.warmup", "latency.repeats"),
                "the latency measurement and a latency budget's calibration, both off here",
                "drop --no-latency",
                bool(latency.enabled or (ranks.latency_reduction and latency.calibrate)),
            ),
            (
                ("latency.fail_if_slower",),
                "the latency measurement, which --no-latency turns off",
                "drop --no-latency",
                latency.enabled,
            ),
            (
                ("latency.batch", "latency.threads"),
                "the latency measurement and the latency gate, both off in this run",
                "drop --no-latency",
                bool(latency.enabled or latency.gate or ranks.latency_reduction),
            ),
            (
                ("latency.gate",),
                "the latency gate, which does not run with --plan (the plan is replayed)",
                "drop --plan",
                self.plan is None,
            ),
            (
                ("latency.gate_margin", "latency.gate_efficiency"),
                "the latency gate, which does not run with --plan (the plan is replayed)"
                if self.plan is not None
                else "the latency gate, off in this run (on with a budget and the latency "
                "measurement)",
                "drop --plan" if self.plan is not None else "add --latency-gate",
                self.plan is None and bool(latency.gate),
            ),
            (
                ("latency.cache_dir",),
                "the latency gate and a latency budget",
                "add --latency-gate",
                bool(latency.gate or ranks.latency_reduction),
            ),
            (
                ("latency.calibrate",),
                "a latency budget's planning",
                "add --latency-reduction",
                bool(ranks.latency_reduction),
            ),
            (
                ("ranks.round_to",),
                "a budget's planning and the latency gate",
                f"add {budget}" if self.plan is None else "drop --plan",
                # None and 0 turn the alignment off: no request, whatever plans.
                ranks.round_to in (None, 0)
                or (self.plan is None and bool(ranks.budgeted or latency.gate)),
            ),
            (("eval_limit",), "the evaluation", "add --eval-data", bool(self.eval_data)),
            (("train_limit",), "the recovery", "add --train-data", bool(self.train_data)),
            (
                ("data.crop_ratio", "data.workers", "data.skip_bad_images"),
                "the data loading",
                "add --train-data or --eval-data",
                bool(self.train_data or self.eval_data),
            ),
            (
                ("statistics.data_aware",),
                "the passes on training images",
                "add --train-data",
                bool(self.train_data),
            ),
            (
                ("finetune.device",),
                "the refit's steps and the fine-tuning",
                "add --train-data with the refit's steps or --finetune-epochs N",
                self.finetune.epochs > 0
                or (self.refits and bool(self.refit_steps or self.refit_segment_steps)),
            ),
            (
                ("resume",),
                "the fine-tuning",
                "add --finetune-epochs N",
                self.finetune.epochs > 0,
            ),
        ]
        selector = ranks.selector if self.plan is None else "none (--plan)"
        reads = get_selector(ranks.selector).reads if self.plan is None else frozenset()
        paths = [f"search.{key}" for key in SearchConfig.model_fields] + ["ranks.epsilon"]
        for path in paths:
            readers = [name for name, each in SELECTORS.items() if path in each.reads]
            if readers:
                names = " or ".join(f"--select {name}" for name in readers)
                rules.append(
                    ((path,), f"{names}, not --select {selector}", f"add {names}", path in reads)
                )
        for paths, reader, remedy, read in rules:
            if not read:
                yield from ((path, reader, remedy) for path in paths)

    @model_validator(mode="after")
    def _recalibration_samples_need_it(self) -> CompressConfig:
        default = type(self).model_fields["recalibrate_samples"].default
        if self.recalibrate_samples != default and not (self.recalibrate and self.train_data):
            why = "--recalibrate" if self.train_data else "--train-data"
            raise ConfigError(
                "--recalibrate-samples is read by BatchNorm recalibration, which needs "
                f"{why}; add it or drop --recalibrate-samples"
            )
        return self

    @model_validator(mode="after")
    def _statistics_need_data(self) -> CompressConfig:
        # A value other than the default (a written-out config restates the defaults).
        given = sorted(
            key
            for key in self.statistics.model_fields_set - {"data_aware"}
            if getattr(self.statistics, key) != StatisticsConfig.model_fields[key].default
        )
        for key in given:
            readers = "data-aware fits and the last-stage refit" if key == "samples" else None
            if readers and not (self.data_aware or self.refits or self.reads_moments):
                why = "--data-aware or --refit" if self.train_data else "--train-data"
            elif not readers and not (self.data_aware or self.reads_moments):
                readers = "data-aware fits and --select output"
                why = "--data-aware" if self.train_data else "--train-data"
            else:
                continue
            raise ConfigError(
                f"statistics.{key} is read by {readers}, but they need {why}; drop it"
            )
        return self

    @property
    def data_aware(self) -> bool:
        """Whether layers are fitted to their outputs on the training images."""
        return self.train_data is not None and self.statistics.data_aware

    @property
    def reads_moments(self) -> bool:
        """Whether planning reads the layers' input statistics (`--select output`)."""
        return self.train_data is not None and self.ranks.selector == "output" and self.plan is None

    @property
    def refits(self) -> bool:
        """Whether the blocks' last stages are refitted to the original layers' outputs."""
        return self.train_data is not None and self.refit


# Config path → its `rankfold compress` flag, for messages.
FLAGS = {option.path: option.name for option in OPTIONS}

# Keys that moved: a file still using one gets told where it went.
MOVED = {"search.seed": "seed", "finetune.seed": "seed"}
BUDGETS = ("macs_reduction", "params_reduction", "latency_reduction")


def build_config(data: dict[str, Any], source: str = "configuration") -> CompressConfig:
    try:
        return CompressConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, CompressConfig, source, MOVED, FLAGS) from None


def effective(config: CompressConfig) -> dict[str, Any]:
    """The whole config as plain data, defaults included: `build_config` on it gives it back."""
    data = config.model_dump(mode="json")
    # A printed config is shared like a report: a URL's password is not (libpq reads it from
    # PGPASSWORD or ~/.pgpass instead).
    data["search"]["storage"] = redacted(config.search.storage)
    # Unread there, and a given value is then an error.
    if config.ranks.selector != "error":
        del data["ranks"]["rel_error"]
    if not config.ranks.reads_energy:
        del data["ranks"]["energy"]
    # Defaults that follow other settings stay unset where they took the default: a file
    # read back with another optimizer or latency setting then gets that one's defaults.
    settings = config.finetune
    if settings.lr == DEFAULT_LR[settings.optimizer]:
        data["finetune"]["lr"] = None
    if settings.weight_decay == DEFAULT_WEIGHT_DECAY[settings.optimizer]:
        data["finetune"]["weight_decay"] = None
    if config.latency.gate == config.gate_default:
        data["latency"]["gate"] = None
    return data


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping (validated later, merged with command-line options)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing .yaml or .json file")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(
            f"config file {path} cannot be parsed ({first}); fix its syntax"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings at the top level")
    return data


def layered(*layers: dict[str, Any]) -> dict[str, Any]:
    """Merge settings lowest first (preset, file, options). A layer that gives a budget or a
    global rank replaces the lower layers' budget and rank, so `--preset fast --latency-reduction
    2` has one budget and `--preset fast --rank 0.5` none; one that gives a plan replaces their
    rank settings and gate, which the plan makes moot (the channel alignment aside)."""
    result: dict[str, Any] = {}
    for layer in layers:
        ranks, below = layer.get("ranks"), result.get("ranks")
        if isinstance(below, dict):
            if layer.get("plan") is not None:
                result["ranks"] = {k: v for k, v in below.items() if k == "round_to"}
                gate = result.get("latency", {})
                if isinstance(gate, dict) and "gate" in gate:  # the gate plans; a plan is replayed
                    result["latency"] = {k: v for k, v in gate.items() if k != "gate"}
            elif isinstance(ranks, dict) and any(
                ranks.get(key) is not None for key in (*BUDGETS, "rank")
            ):
                result["ranks"] = {k: v for k, v in below.items() if k not in (*BUDGETS, "rank")}
        result = merge(result, layer)
    return result


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested merge: values of `overrides` (not None) override the base's."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            current = merged.get(key)
            merged[key] = merge(current if isinstance(current, dict) else {}, value)
        else:
            merged[key] = value
    return merged
