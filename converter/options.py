"""Every `rankfold compress` option, written once: flag, config path, type, parser, help, panel.

The typer command is generated from `OPTIONS` and the CLI builds its override dict by walking it,
so a flag and its `CompressConfig` path cannot drift apart (tests/test_cli_config.py walks both
ways). Imports nothing heavy: `rankfold compress --help` reads this module only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankfold.passes.core import ConfigError

MODEL, RANKS, SELECTION, RECOVERY, DEPLOYMENT, OUTPUT = (
    "Model and data",
    "Ranks",
    "Selection",
    "Recovery",
    "Deployment",
    "Output",
)


def input_shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--input-shape '{text}' must be three integers C,H,W, e.g. 3,32,32"
        ) from None
    return c, h, w


def float_list(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"{option} '{text}' must be comma-separated numbers, one per channel, e.g. "
            "0.485,0.456,0.406"
        ) from None


def int_list(text: str, option: str = "--batch") -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} '{text}' must be comma-separated integers, e.g. 1,8") from None


def round_to(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit():
        raise ConfigError(f"--round-to '{text}' must be auto, 0 (off) or a positive integer")
    return int(text)


def rank_value(text: str) -> int | float | list[int]:
    try:
        if "," in text:
            return [int(v) for v in text.split(",")]
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ConfigError(
            f"rank '{text}' must be an integer, a ratio like 0.25, or integers like 32,16"
        ) from None


def layer_ranks(items: list[str]) -> dict[str, dict[str, Any]]:
    layers: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--layer-rank '{item}' must look like NAME_OR_GLOB=RANK")
        layers[key] = {"rank": rank_value(value)}
    return layers


@dataclass(frozen=True)
class Option:
    """One flag: `path` is its dotted place in CompressConfig (e.g. `latency.gate`)."""

    path: str
    help: str
    panel: str
    kind: type = str  # what the shell gives typer: str, int, float, bool or Path
    flag: str = ""  # default: --LAST-PATH-PART
    short: str | None = None
    many: bool = False  # repeatable; the values arrive as a list
    parse: Callable[[Any], Any] | None = None  # shell value → config value

    @property
    def name(self) -> str:
        return self.flag or "--" + self.path.rsplit(".", 1)[-1].replace("_", "-")

    @property
    def param(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    @property
    def decls(self) -> tuple[str, ...]:
        # Booleans take --x/--no-x so that leaving both out keeps the file's (or default) value.
        first = f"{self.name}/--no-{self.name[2:]}" if self.kind is bool else self.name
        return (first, self.short) if self.short else (first,)


OPTIONS: tuple[Option, ...] = (
    # ---- model and data
    Option("weights", "Checkpoint (.pt/.th state dict) to load.", MODEL, Path, short="-w"),
    Option(
        "input_shape", "C,H,W for models without a known input shape.", MODEL, parse=input_shape
    ),
    Option(
        "leaf_modules", "Module name to keep whole when tracing.", MODEL, flag="--leaf", many=True
    ),
    Option(
        "mean",
        "Per-channel input mean on the 0..1 scale, e.g. 0.485,0.456,0.406 (default: the model's).",
        MODEL,
        parse=lambda text: float_list(text, "--mean"),
    ),
    Option(
        "std",
        "Per-channel input std on the 0..1 scale, e.g. 0.229,0.224,0.225 (default: the model's).",
        MODEL,
        parse=lambda text: float_list(text, "--std"),
    ),
    Option("eval_data", ".npz (x uint8 N×C×H×W, y) or ImageFolder directory.", MODEL, Path),
    Option("eval_limit", "Use the first N evaluation samples.", MODEL, int),
    Option(
        "train_data",
        "Training data: BatchNorm recalibration, fine-tuning, data-driven selectors.",
        MODEL,
        Path,
    ),
    Option("train_limit", "Use the first N training samples.", MODEL, int),
    Option(
        "data.crop_ratio",
        "Evaluation crop / resized shorter side for ImageFolder images (0.875: 256 → 224).",
        MODEL,
        float,
    ),
    Option(
        "data.workers",
        "Processes decoding ImageFolder images (default: up to 4, one core left free).",
        MODEL,
        int,
        "--data-workers",
    ),
    Option(
        "data.skip_bad_images",
        "Leave unreadable images out (counted in the report) instead of failing.",
        MODEL,
        bool,
    ),
    Option("seed", "The one seed: factorizations, search sampler, fine-tuning (0).", MODEL, int),
    # ---- ranks
    Option(
        "ranks.method",
        "svd, tucker2, cp, cp-epc, tucker2-cp, cp-lrf (`rankfold methods`).",
        RANKS,
    ),
    Option(
        "ranks.rank", "Rank for every layer: 16, a ratio 0.25, or 32,16.", RANKS, parse=rank_value
    ),
    Option(
        "ranks.layers",
        "NAME_OR_GLOB=RANK per-layer rank (repeatable; method and skip per layer: in a file).",
        RANKS,
        flag="--layer-rank",
        many=True,
        parse=layer_ranks,
    ),
    Option(
        "ranks.skip", "Layer name, glob, parent or type (Linear, Conv2d) to keep.", RANKS, many=True
    ),
    Option("ranks.macs_reduction", "Budget: whole-model MAC reduction, e.g. 2.", RANKS, float),
    Option("ranks.params_reduction", "Budget: whole-model parameter reduction.", RANKS, float),
    Option(
        "ranks.latency_reduction",
        "Budget: measured speedup, e.g. 2 (each layer and block timed in onnxruntime on "
        "--provider at the first --batch size; ranks then move to the --round-to multiple where "
        "measured faster; the whole model is then timed and re-planned, see --calibrate).",
        RANKS,
        float,
    ),
    Option(
        "ranks.round_to",
        "Align budgeted ranks to multiples: auto (--provider's channel block), N, or 0 (off).",
        RANKS,
        parse=round_to,
    ),
    Option(
        "ranks.min_macs_share",
        "Keep layers whole below this share of the model's MACs (0.005).",
        RANKS,
        float,
    ),
    Option("plan", "Replay a saved plan.json.", RANKS, Path),
    Option(
        "statistics.data_aware",
        "Fit each layer to its outputs on --train-data images, not to its weights (off by "
        "default: with --refit and BatchNorm recalibration it does not beat weight-only fits).",
        RANKS,
        bool,
    ),
    Option(
        "statistics.samples",
        "Training images the layers' input statistics (data-aware fits) and the last-stage "
        "refit read (1024).",
        RANKS,
        int,
        "--stats-samples",
    ),
    Option(
        "statistics.damping",
        "Data-aware fits: the input moment fitted is Σ + damping·tr(Σ)/n·I (0.01).",
        RANKS,
        float,
    ),
    Option(
        "statistics.memory_mb",
        "Data-aware fits: memory of the statistics pass in MiB (512).",
        RANKS,
        int,
        "--stats-memory-mb",
    ),
    # ---- selection
    Option(
        "ranks.select",
        "Rank selector: uniform, energy, error, output, vbmf, eps-search, pars (default: energy "
        "for tucker2 under a MACs or parameter budget, uniform otherwise).",
        SELECTION,
    ),
    Option(
        "ranks.energy",
        "--select energy without a budget: retained energy of the unfoldings (0.95).",
        SELECTION,
        float,
    ),
    Option(
        "ranks.rel_error",
        "error: relative error bound per layer, 0.3 (cp-lrf: LRF-CPD ranks).",
        SELECTION,
        float,
    ),
    Option(
        "ranks.epsilon", "eps-search: accuracy drop per layer, a fraction (0.01).", SELECTION, float
    ),
    Option("search.trials", "pars: number of trials (100).", SELECTION, int),
    Option("search.sampler", "pars: optuna sampler, gp or tpe.", SELECTION),
    Option("search.proxy", "pars: proxy score, accuracy, agreement or kd.", SELECTION),
    Option(
        "search.storage",
        "pars: optuna storage shared by workers: sqlite:///f.db, postgresql://user@host/db "
        "(password from PGPASSWORD or ~/.pgpass), or journal:f.log (one process).",
        SELECTION,
    ),
    Option("search.study_name", "pars: study name (resumable).", SELECTION),
    Option("search.workers", "pars: worker processes.", SELECTION, int),
    Option(
        "search.heartbeat",
        "pars: heartbeat seconds (10); a trial silent for 3 is failed and redone elsewhere.",
        SELECTION,
        int,
    ),
    Option("search.calib_samples", "Search: images the proxy is scored on (1024).", SELECTION, int),
    Option(
        "search.bn_samples", "Search: images BatchNorm is recalibrated on (512).", SELECTION, int
    ),
    Option("search.batch_size", "Search: batch size (128).", SELECTION, int, "--search-batch-size"),
    Option(
        "search.cache_dir",
        "Search: decomposition cache (default $RANKFOLD_CACHE or ~/.cache/rankfold).",
        SELECTION,
        Path,
        "--search-cache-dir",
    ),
    Option(
        "search.timeout",
        "Search: seconds after which no new trial starts.",
        SELECTION,
        float,
        "--search-timeout",
    ),
    # ---- recovery
    Option(
        "refit",
        "Refit each block's last stage, in graph order, to the original layer's outputs on "
        "--stats-samples training images, fed the compressed network's activations (on with "
        "--train-data).",
        RECOVERY,
        bool,
    ),
    Option(
        "refit_steps",
        "Refit: then Adam steps on all of each block's stages together, same objective (200; 0: "
        "the last stage only). Runs where --finetune-device says.",
        RECOVERY,
        int,
    ),
    Option(
        "refit_segment_steps",
        "Refit: then Adam steps on each segment's blocks together, fitting the segment's output "
        "(a residual unit through its ReLU; the last block through the output) (default: as "
        "--refit-steps where the plan has tucker2 or tucker2-cp blocks, else 0; 0: off).",
        RECOVERY,
        int,
    ),
    Option(
        "refit_memory_mb",
        "Memory for the activations the refit and bias correction hold for all their images "
        "(4096); fewer images are read where more would not fit.",
        RECOVERY,
        int,
    ),
    Option("recalibrate", "Recalibrate BatchNorm (bias correction without BN).", RECOVERY, bool),
    Option(
        "recalibrate_samples",
        "Training images BatchNorm is recalibrated on, the first ones (8192).",
        RECOVERY,
        int,
    ),
    Option(
        "finetune.epochs",
        "Fine-tuning epochs after decomposition (0: none).",
        RECOVERY,
        int,
        "--finetune-epochs",
    ),
    Option("finetune.lr", "Learning rate (SGD 1e-3, AdamW 3e-4).", RECOVERY, float),
    Option("finetune.batch_size", "Fine-tuning batch size (128).", RECOVERY, int),
    Option("finetune.optimizer", "sgd or adamw.", RECOVERY),
    Option("finetune.momentum", "SGD momentum (0.9).", RECOVERY, float),
    Option("finetune.weight_decay", "Weight decay (SGD 5e-4, AdamW 0.05).", RECOVERY, float),
    Option("finetune.distill", "Distil from the original.", RECOVERY, bool),
    Option("finetune.temperature", "Distillation temperature (4).", RECOVERY, float),
    Option("finetune.alpha", "Weight of the distillation term (0.9).", RECOVERY, float),
    Option(
        "finetune.mixup",
        "Mixup Beta(a, a) concentration a; teacher and student see the same mix (0: off).",
        RECOVERY,
        float,
    ),
    Option(
        "finetune.augment",
        "auto, cifar, resized-crop or none (auto: cifar for 3×32×32, resized-crop from 96 px).",
        RECOVERY,
    ),
    Option("finetune.train_only_decomposed", "Train only the factorized blocks.", RECOVERY, bool),
    Option(
        "finetune.amp",
        "bfloat16 autocast for fine-tuning and the refit's Adam steps, on CUDA and on CPUs "
        "with AMX (off: float32).",
        RECOVERY,
        bool,
    ),
    Option(
        "finetune.device",
        "Where fine-tuning and the refit's steps run: auto (CUDA when torch sees a GPU), cpu or "
        "cuda.",
        RECOVERY,
        flag="--finetune-device",
    ),
    Option("finetune.eval_batch_size", "Evaluation batch size (256).", RECOVERY, int),
    Option(
        "finetune.checkpoint_every",
        "Also checkpoint every N steps (0: at epoch ends), for --resume mid-epoch.",
        RECOVERY,
        int,
    ),
    Option(
        "finetune.validation",
        "Hold out this share of the training images and keep the epoch best on them (0: the "
        "last epoch). --eval-data never chooses.",
        RECOVERY,
        float,
    ),
    Option("resume", "Continue an interrupted fine-tuning in --out.", RECOVERY, bool),
    # ---- deployment
    Option(
        "export.cleanup",
        "Fold BatchNorm, merge 1×1 convs and drop identities before export.",
        DEPLOYMENT,
        bool,
    ),
    Option("export.opset", "ONNX opset (18).", DEPLOYMENT, int),
    Option("export.atol", "ONNX parity tolerance, absolute (1e-4).", DEPLOYMENT, float),
    Option(
        "export.rtol",
        "ONNX parity tolerance relative to the largest output (1e-5).",
        DEPLOYMENT,
        float,
    ),
    Option("export.parity_samples", "Inputs the parity check runs (64).", DEPLOYMENT, int),
    Option("latency.enabled", "Measure latency.", DEPLOYMENT, bool, "--latency"),
    Option("latency.provider", "onnxruntime provider: cpu or cuda.", DEPLOYMENT),
    Option("latency.batch", "Latency batch sizes, e.g. 1,8.", DEPLOYMENT, parse=int_list),
    Option("latency.warmup", "Untimed runs per batch size (5).", DEPLOYMENT, int),
    Option("latency.repeats", "Timed runs per batch size, median (30).", DEPLOYMENT, int),
    Option(
        "latency.threads",
        "Intra-op threads the model is deployed with, e.g. 1 or 1,2: every timing, the gate "
        "and a latency budget use them (default: all cores).",
        DEPLOYMENT,
        parse=lambda text: int_list(text, "--threads"),
    ),
    Option(
        "latency.gate",
        "Time each planned block against its layer (--provider, every --batch and --threads) "
        "and keep the layer whole unless the block is --gate-margin faster; with --round-to, "
        "ranks first move to the multiple where that measures faster (default: on with a "
        "budget while latency is measured).",
        DEPLOYMENT,
        bool,
        "--latency-gate",
    ),
    Option(
        "latency.gate_margin",
        "Latency gate: how much faster a block must be (0.05).",
        DEPLOYMENT,
        float,
    ),
    Option(
        "latency.gate_efficiency",
        "Latency gate: also keep a layer whole unless its block's speedup is at least this "
        "share of its MAC reduction (e.g. 0.9; default 0, off).",
        DEPLOYMENT,
        float,
    ),
    Option(
        "latency.calibrate",
        "--latency-reduction: re-plan up to N times until the whole exported model, timed "
        "against the original, is that much faster (default 2; 0 trusts the per-layer table).",
        DEPLOYMENT,
        int,
    ),
    Option(
        "latency.fail_if_slower",
        "Exit with code 1 when the compressed model is measurably slower than the original "
        "at any batch size or thread count (for CI; the report is still written).",
        DEPLOYMENT,
        bool,
    ),
    Option(
        "quantize.dtype",
        "Also write INT8 model.int8.onnx and original.int8.onnx: int8 "
        "(static, QDQ, calibrated on --train-data).",
        DEPLOYMENT,
        flag="--quantize",
    ),
    Option(
        "quantize.float_layers",
        "Layer name, glob or parent to keep in float when quantizing (repeatable; auto: the "
        "first conv and the last linear; sensitive: the layers losing most SQNR, until top-1 "
        "agreement reaches --min-agreement on held-out training images; default auto and "
        "sensitive; none: quantize all).",
        DEPLOYMENT,
        many=True,
    ),
    Option(
        "quantize.max_float_share",
        "Cap of --float-layers sensitive: the float layers hold at most this share of the "
        "conv/linear MACs (0.25).",
        DEPLOYMENT,
        float,
    ),
    Option(
        "quantize.calibration",
        "INT8 activation ranges: auto, minmax, entropy or percentile (auto: min/max and "
        "percentile both calibrated, the file whose outputs stay closer to the float model's "
        "on held-out training images kept).",
        DEPLOYMENT,
        flag="--quant-calibration",
    ),
    Option(
        "quantize.samples",
        "Training images INT8 ranges are calibrated on (256).",
        DEPLOYMENT,
        int,
        "--quant-samples",
    ),
    Option(
        "quantize.equalize",
        "Before calibrating, rescale the channels between a factorized block's stages so one "
        "INT8 range fits them all (exact in float; on by default).",
        DEPLOYMENT,
        bool,
        "--quant-equalize",
    ),
    Option(
        "quantize.reduce_range",
        "INT8 weights in 7 bits, for CPUs whose int8 kernels saturate in 16 bits (x86 without "
        "VNNI); default: on exactly when this CPU is one (set it for another deployment CPU).",
        DEPLOYMENT,
        bool,
        "--quant-reduce-range",
    ),
    Option(
        "quantize.stem_output",
        "Quantize the last stage of a factorized first conv, which `auto` keeps float whole: "
        "faster (that stage and the pool after it run in int8), but its rounding reaches every "
        "later layer; measure the accuracy (BENCHMARKS.md, issue #16).",
        DEPLOYMENT,
        bool,
        "--quant-stem-output",
    ),
    Option(
        "quantize.min_agreement",
        "INT8 tolerance: share of evaluation images on which it must predict the float "
        "model's class (0.97); below it exits 1 with the report written.",
        DEPLOYMENT,
        float,
    ),
    Option(
        "latency.cache_dir",
        "Cache of measured layer times (default ~/.cache/rankfold/latency).",
        DEPLOYMENT,
        Path,
        "--latency-cache-dir",
    ),
)


def overrides(values: dict[str, Any]) -> dict[str, Any]:
    """The nested config dict of the options given (by typer parameter name); None: not given."""
    tree: dict[str, Any] = {}
    for option in OPTIONS:
        value = values.get(option.param)
        if value is None or (option.many and not value):
            continue
        *parents, leaf = option.path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = option.parse(value) if option.parse else value
    return tree
