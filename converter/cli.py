"""The `rankfold` command line: fills a config and calls the pipeline. Heavy imports are lazy so
`rankfold --help` answers at once; every RankfoldError becomes one line and exit code 1."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compress trained CNNs with low-rank tensor decompositions; export and validate ONNX.",
)

ModelArg = Annotated[
    str,
    typer.Argument(
        help="resnet20|32|44|56|110, digits-cnn, torchvision:NAME, or path/to/file.py:factory"
    ),
]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", "-w", help="Checkpoint (.pt/.th state dict) to load.")
]
ShapeOpt = Annotated[
    str | None, typer.Option("--input-shape", help="C,H,W for models without a known input shape.")
]
LeafOpt = Annotated[
    list[str] | None, typer.Option("--leaf", help="Module name to keep whole when tracing.")
]


def _friendly(func):
    """Turn rankfold's typed errors into one line on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from rankfold.passes.core import RankfoldError

        try:
            return func(*args, **kwargs)
        except RankfoldError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            typer.secho("interrupted; files already written are complete", fg="yellow", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


def _shape(text: str | None) -> tuple[int, int, int] | None:
    from rankfold.passes.core import ConfigError

    if text is None:
        return None
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--input-shape '{text}' must be three integers C,H,W, e.g. 3,32,32"
        ) from None
    return c, h, w


def _int_list(text: str, option: str) -> list[int]:
    from rankfold.passes.core import ConfigError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} '{text}' must be comma-separated integers, e.g. 1,8") from None


def _round_to(text: str | None) -> int | str | None:
    from rankfold.passes.core import ConfigError

    if text is None or text == "auto":
        return text
    if not text.isdigit():
        raise ConfigError(f"--round-to '{text}' must be auto, 0 (off) or a positive integer")
    return int(text)


TARGETS = ("macs", "params", "latency")


def _budget(
    target: str | None,
    reduction: float | None,
    macs_reduction: float | None,
    params_reduction: float | None,
) -> dict[str, float | None]:
    """The policy's budget fields from --target/--reduction and the --macs/--params shorthands."""
    from rankfold.passes.core import ConfigError

    budget = {"macs_reduction": macs_reduction, "params_reduction": params_reduction}
    if target is not None and target not in TARGETS:
        raise ConfigError(f"--target '{target}' is unknown; choose one of {', '.join(TARGETS)}")
    if reduction is None:
        if target is not None and budget.get(f"{target}_reduction") is None:
            raise ConfigError(f"--target {target} needs --reduction X (e.g. --reduction 2)")
        return budget
    key = f"{target or 'macs'}_reduction"
    if budget.get(key) is not None:
        raise ConfigError(f"give --reduction or --{key.replace('_', '-')}, not both")
    budget[key] = reduction
    return budget


def _rank_value(text: str) -> int | float | list[int]:
    from rankfold.passes.core import ConfigError

    try:
        if "," in text:
            return [int(v) for v in text.split(",")]
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ConfigError(
            f"rank '{text}' must be an integer, a ratio like 0.25, or integers like 32,16"
        ) from None


@app.command()
@_friendly
def analyze(
    model: ModelArg,
    weights: WeightsOpt = None,
    input_shape: ShapeOpt = None,
    leaf: LeafOpt = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the table as JSON.")
    ] = None,
) -> None:
    """Per-layer table: shapes, parameters and MACs on the traced shapes."""
    import torch
    from rich.table import Table

    from rankfold.converter.ui import console
    from rankfold.models import load_model
    from rankfold.passes import analyze as analyze_layers
    from rankfold.passes import trace
    from rankfold.passes.core import atomic_write_json

    net, spec = load_model(model, weights, _shape(input_shape))
    result = analyze_layers(trace(net, torch.zeros(1, *spec.input_shape), leaf or []))
    table = Table(title=f"{model}: {result.total_params:,} params, {result.total_macs:,} MACs")
    for column in ("layer", "type", "input", "output", "kernel", "params", "MACs", "share"):
        table.add_column(
            column, justify="right" if column in ("params", "MACs", "share") else "left"
        )
    for layer in result.layers:
        table.add_row(
            layer.name,
            layer.type,
            "×".join(map(str, layer.in_shape)),
            "×".join(map(str, layer.out_shape)),
            "×".join(map(str, layer.kernel_size)),
            f"{layer.params:,}",
            f"{layer.macs:,}",
            f"{layer.macs / max(result.total_macs, 1):.1%}",
        )
    console.print(table)
    if json_out is not None:
        atomic_write_json(
            json_out,
            {
                "model": model,
                "params": result.total_params,
                "macs": result.total_macs,
                "layers": [layer.to_dict() for layer in result.layers],
            },
        )


@app.command()
@_friendly
def compress(
    model: ModelArg,
    method: Annotated[
        str | None,
        typer.Option(help="svd, tucker2, cp, cp-epc, tucker2-cp, cp-lrf (`rankfold methods`)."),
    ] = None,
    macs_reduction: Annotated[
        float | None, typer.Option(help="Whole-model MAC reduction target, e.g. 2.")
    ] = None,
    params_reduction: Annotated[
        float | None, typer.Option(help="Whole-model parameter reduction target.")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="What --reduction budgets: macs (default), params, or latency (each layer and "
            "block timed in onnxruntime on --provider at the first --batch size; ranks then "
            "move to the --round-to multiple where measured faster; the whole model is then "
            "timed and re-planned, see --calibrate)."
        ),
    ] = None,
    reduction: Annotated[
        float | None,
        typer.Option(help="Reduction of --target, e.g. 3 (--target latency: 3× faster)."),
    ] = None,
    rank: Annotated[
        str | None, typer.Option(help="Rank for every layer: 16, a ratio 0.25, or 32,16.")
    ] = None,
    layer_rank: Annotated[
        list[str] | None,
        typer.Option("--layer-rank", help="NAME_OR_GLOB=RANK per-layer override (repeatable)."),
    ] = None,
    skip: Annotated[
        list[str] | None,
        typer.Option(help="Layer name, glob, parent or type (Linear, Conv2d) to keep."),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(help="Rank selector: uniform, energy, error, vbmf, eps-search, pars."),
    ] = None,
    rel_error: Annotated[
        float | None,
        typer.Option(
            help="--select error: relative error bound per layer (cp-lrf: LRF-CPD ranks)."
        ),
    ] = None,
    trials: Annotated[int | None, typer.Option(help="pars: number of trials.")] = None,
    storage: Annotated[
        str | None, typer.Option(help="pars: optuna storage (sqlite:///f.db, journal file, …).")
    ] = None,
    study_name: Annotated[str | None, typer.Option(help="pars: study name (resumable).")] = None,
    workers: Annotated[int | None, typer.Option(help="pars: worker processes.")] = None,
    round_to: Annotated[
        str | None,
        typer.Option(
            help="Align budgeted ranks to multiples: auto (--provider's channel block), N, or 0."
        ),
    ] = None,
    weights: WeightsOpt = None,
    input_shape: ShapeOpt = None,
    leaf: LeafOpt = None,
    plan: Annotated[Path | None, typer.Option(help="Replay a saved plan.json.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML/JSON config; options override it.")
    ] = None,
    eval_data: Annotated[
        Path | None, typer.Option(help=".npz (x uint8 N×C×H×W, y) or ImageFolder directory.")
    ] = None,
    eval_limit: Annotated[
        int | None, typer.Option(help="Use the first N evaluation samples.")
    ] = None,
    train_data: Annotated[
        Path | None,
        typer.Option(help="Training data: BatchNorm recalibration, and fine-tuning if asked."),
    ] = None,
    train_limit: Annotated[
        int | None, typer.Option(help="Use the first N training samples.")
    ] = None,
    recalibrate: Annotated[
        bool, typer.Option(help="Recalibrate BatchNorm (bias correction without BN).")
    ] = True,
    finetune_epochs: Annotated[
        int | None, typer.Option(help="Fine-tuning epochs after decomposition (0: none).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (SGD 0.01, AdamW 1e-3).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Fine-tuning batch size.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd or adamw.")] = None,
    distill: Annotated[
        bool | None, typer.Option("--distill/--no-distill", help="Distil from the original.")
    ] = None,
    train_only_decomposed: Annotated[
        bool, typer.Option(help="Train only the factorized blocks.")
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted fine-tuning in --out.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out"),
    provider: Annotated[str | None, typer.Option(help="onnxruntime provider: cpu or cuda.")] = None,
    batch: Annotated[str | None, typer.Option(help="Latency batch sizes, e.g. 1,8.")] = None,
    no_latency: Annotated[
        bool, typer.Option("--no-latency", help="Skip latency measurement.")
    ] = False,
    latency_gate: Annotated[
        bool | None,
        typer.Option(
            "--latency-gate/--no-latency-gate",
            help="Time each planned block against its layer (--provider, every --batch) and keep "
            "the layer whole unless the block is --gate-margin faster; with --round-to, ranks "
            "first move to the multiple where that measures faster.",
        ),
    ] = None,
    gate_margin: Annotated[
        float | None, typer.Option(help="Latency gate: how much faster a block must be (0.05).")
    ] = None,
    gate_efficiency: Annotated[
        float | None,
        typer.Option(
            help="Latency gate: also keep a layer whole unless its block's speedup is at least "
            "this share of its MAC reduction (e.g. 0.9; default 0, off)."
        ),
    ] = None,
    calibrate: Annotated[
        int | None,
        typer.Option(
            help="--target latency: re-plan up to N times until the whole exported model, timed "
            "against the original, is --reduction faster (default 2; 0 trusts the per-layer "
            "table)."
        ),
    ] = None,
    cleanup: Annotated[
        bool | None,
        typer.Option(
            "--cleanup/--no-cleanup",
            help="Fold BatchNorm, merge 1×1 convs and drop identities before export.",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for factorizations.")] = None,
) -> None:
    """Decompose MODEL, export original and compressed ONNX, validate, and write a report."""
    from rankfold.converter.config import build_config, load_config_file, merge
    from rankfold.converter.pipeline import run_compress
    from rankfold.passes.core import ConfigError

    overrides: dict[str, Any] = {}
    for item in layer_rank or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--layer-rank '{item}' must look like NAME_OR_GLOB=RANK")
        overrides[key] = {"rank": _rank_value(value)}
    cli: dict[str, Any] = {
        "model": model,
        "weights": weights,
        "input_shape": _shape(input_shape),
        "leaf_modules": leaf or None,
        "plan": plan,
        "eval_data": eval_data,
        "eval_limit": eval_limit,
        "train_data": train_data,
        "train_limit": train_limit,
        "recalibrate": None if recalibrate else False,
        "resume": resume or None,
        "finetune": {
            "epochs": finetune_epochs,
            "lr": lr,
            "batch_size": batch_size,
            "optimizer": optimizer,
            "distill": distill,
            "train_only_decomposed": train_only_decomposed or None,
        },
        "seed": seed,
        "ranks": {
            "method": method,
            **_budget(target, reduction, macs_reduction, params_reduction),
            "rank": None if rank is None else _rank_value(rank),
            "layers": overrides or None,
            "skip": skip or None,
            "round_to": _round_to(round_to),
            "select": "error" if rel_error is not None and select is None else select,
            "rel_error": rel_error,
        },
        "search": {
            "trials": trials,
            "storage": storage,
            "study_name": study_name,
            "workers": workers,
        },
        "latency": {
            "provider": provider,
            "batch": None if batch is None else _int_list(batch, "--batch"),
            "enabled": False if no_latency else None,
            "gate": latency_gate,
            "gate_margin": gate_margin,
            "gate_efficiency": gate_efficiency,
            "calibrate": calibrate,
        },
        "export": {"cleanup": cleanup},
    }
    base = load_config_file(config) if config is not None else {}
    settings = build_config(merge(base, cli), source=str(config) if config else "options")
    result = run_compress(settings, out)
    _print_summary(result.report, out)


def _print_summary(report: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    from rankfold.converter.ui import console

    table = Table(title=f"{report['model']} — {report['method']}")
    table.add_column("layer")
    table.add_column("method")
    table.add_column("rank")
    table.add_column("MACs", justify="right")
    table.add_column("rel. error", justify="right")
    table.add_column("status / reason")
    for row in report["layers"]:
        table.add_row(
            row["name"],
            row["method"] or "-",
            "×".join(map(str, row["rank"] or [])) or "-",
            f"{row['original_macs']:,} → {row['macs']:,}",
            "-" if row["rel_error"] is None else f"{row['rel_error']:.3f}",
            row["reason"] if row["status"] == "skipped" else row["status"],
        )
    console.print(table)
    acc = lambda v: "n/a" if v is None else f"{v:.2%}"  # noqa: E731
    lines = [
        f"MACs {report['original']['macs']:,} → {report['compressed']['macs']:,} "
        f"({report['macs_reduction']:.2f}×), params {report['params_reduction']:.2f}× fewer",
        f"accuracy: original {acc(report['original']['accuracy'])}, decomposed "
        f"{acc(report['compressed']['accuracy_decomposed'])}, recalibrated "
        f"{acc(report['compressed']['accuracy_recalibrated'])}, fine-tuned "
        f"{acc(report['compressed']['accuracy_finetuned'])}, ONNX {acc(report['onnx']['accuracy'])}",
        f"ONNX parity: max abs diff {report['onnx']['max_abs_diff']:.2e} "
        f"(tolerance {report['onnx']['atol']:.0e})",
    ]
    gate = (report.get("selection") or {}).get("latency_gate")
    if gate:
        where = f"{gate['provider']}, batch {','.join(map(str, gate['batch']))}"
        lines.append(
            f"latency gate ({where}, margin {gate['margin']:.0%}): {len(gate['reverted'])} "
            f"layer(s) kept whole, {len(gate['rounded'])} rank(s) rounded, "
            f"{gate['measurements']} new timings"
            if gate["gate"]
            else f"measured rank rounding ({where}, multiple of {gate['round_to']}): "
            f"{len(gate['rounded'])} rank(s) rounded, {gate['measurements']} new timings"
        )
    calibration = (report.get("selection") or {}).get("latency_calibration")
    if calibration and "skipped" in calibration:
        lines.append(f"latency calibration skipped: {calibration['skipped']}")
    elif calibration:
        steps = ", ".join(
            f"{r['requested']:.2f}× → {r['measured']:.2f}×"
            if r["measured"]
            else f"{r['requested']:.2f}× out of reach"
            for r in calibration["rounds"]
        )
        lines.append(
            f"latency calibration ({calibration['provider']}, batch {calibration['batch']}, "
            f"table → whole model): {steps}; kept {calibration['requested']:.2f}× "
            f"(measured {calibration['measured']:.2f}× for target {calibration['target']:.2f}×)"
        )
    if report.get("cleanup"):
        done = report["cleanup"]["compressed"]
        lines.append(
            f"clean-up before export: {done['batchnorms_folded']} BatchNorm(s) folded into convs, "
            f"{done['batchnorms_folded_into_blocks']} into blocks, {done['convs_merged']} 1×1 "
            f"pair(s) merged, {done['identities_dropped']} identity op(s) dropped"
        )
    if report["latency"]:
        for row in report["latency"]["per_batch"]:
            lines.append(
                f"latency ({report['latency']['provider']}, batch {row['batch']}): "
                f"{row['original_ms']:.2f} ms → {row['compressed_ms']:.2f} ms "
                f"(speedup {row['speedup']:.2f}×)"
            )
    lines.append(
        f"wrote {out}/: model.onnx original.onnx plan.json model.pt report.json layers.png"
    )
    for line in lines:
        console.print(line)


@app.command()
@_friendly
def validate(
    onnx_path: Annotated[Path, typer.Argument(help="model.onnx to check.")],
    eval_data: Annotated[Path | None, typer.Option(help="Data to measure accuracy on.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model name for preprocessing (default: from model.pt beside)."),
    ] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Use the first N samples.")] = None,
    provider: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    atol: Annotated[float, typer.Option(help="Parity tolerance.")] = 1e-4,
) -> None:
    """Check an exported model: ONNX checker, parity with the PyTorch model beside it, accuracy."""
    from rankfold.converter.ui import console
    from rankfold.converter.validation import validate_export

    result = validate_export(onnx_path, eval_data, model, eval_limit, provider, atol)
    for key, value in result.items():
        console.print(f"{key}: {value}")
    if result.get("parity_passed") is False:
        raise typer.Exit(code=1)


@app.command()
@_friendly
def bench(
    onnx_path: Annotated[Path, typer.Argument(help="Compressed model.onnx.")],
    baseline: Annotated[Path, typer.Option(help="Original model's ONNX to compare against.")],
    batch: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,8.")] = "1",
    provider: Annotated[
        str, typer.Option(help="Providers, e.g. cpu or cpu,cuda (an unusable one is skipped).")
    ] = "cpu",
    warmup: Annotated[int, typer.Option(help="Untimed runs per batch size.")] = 5,
    repeats: Annotated[int, typer.Option(help="Timed runs per batch size (median).")] = 30,
    threads: Annotated[
        int | None, typer.Option(help="onnxruntime intra-op threads (default: all cores).")
    ] = None,
    macs_reduction: Annotated[
        float | None,
        typer.Option(help="MAC reduction to relate speed to (default: counted in both files)."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the table as JSON.")
    ] = None,
) -> None:
    """Latency of the compressed vs the original ONNX model, side by side, per provider.

    Columns: batch, original ms, compressed ms, speedup, MAC reduction, and speedup / MAC
    reduction (1.0: every saved MAC saved time)."""
    from rich.table import Table

    from rankfold.converter.ui import console, progress_bar
    from rankfold.converter.validation import onnx_input_shape
    from rankfold.passes.core import ProviderError, atomic_write_json
    from rankfold.runtime.latency import BENCH_COLUMNS, bench_providers, format_bench_row

    sizes = _int_list(batch, "--batch")
    providers = [p.strip().lower() for p in provider.split(",") if p.strip()]
    shape = onnx_input_shape(onnx_path)
    runs = len(providers) * len(sizes) * 2 * repeats
    with progress_bar("latency", total=runs) as advance:
        data = bench_providers(
            baseline,
            onnx_path,
            shape,
            sizes,
            providers,
            macs_reduction,
            warmup=warmup,
            repeats=repeats,
            threads=threads,
            progress=lambda _: advance(),
        )
    for name, result in data["providers"].items():
        if "skipped" in result:
            console.print(f"{name}: skipped ({result['skipped']})")
            continue
        table = Table(title=f"{onnx_path} vs {baseline} ({name})")
        for _, header, _ in BENCH_COLUMNS:
            table.add_column(header, justify="right")
        for row in result["rows"]:
            table.add_row(*format_bench_row(row))
        console.print(table)
    if json_out is not None:
        atomic_write_json(json_out, data)
    sys.stdout.write(json.dumps(data) + "\n")
    if all("skipped" in result for result in data["providers"].values()):
        reasons = "; ".join(result["skipped"] for result in data["providers"].values())
        raise ProviderError(f"no provider could run: {reasons}")


@app.command()
@_friendly
def methods() -> None:
    """List the decomposition methods."""
    from rankfold.converter.ui import console
    from rankfold.passes import METHODS

    for name, method in METHODS.items():
        doc = (type(method).__doc__ or "").strip().splitlines()[0]
        console.print(f"[bold]{name}[/bold] ({', '.join(method.rank_names)}): {doc}")


@app.command()
@_friendly
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/demo"),
    epochs: Annotated[int, typer.Option(help="Training epochs for the digits CNN.")] = 8,
    method: Annotated[str, typer.Option(help="Decomposition method.")] = "tucker2",
    macs_reduction: Annotated[float, typer.Option(help="MAC reduction target.")] = 2.0,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 5,
    latency_gate: Annotated[
        bool,
        typer.Option(
            "--latency-gate/--no-latency-gate",
            help="Keep layers whole whose block is not faster in onnxruntime.",
        ),
    ] = True,
) -> None:
    """Offline demo: train a CNN on scikit-learn's digits, compress, fine-tune, export, validate."""
    from rankfold.converter.demo import run_demo

    report = run_demo(
        out,
        epochs=epochs,
        method=method,
        macs_reduction=macs_reduction,
        finetune_epochs=finetune_epochs,
        latency_gate=latency_gate,
    )
    _print_summary(report, out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
