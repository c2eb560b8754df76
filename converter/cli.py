"""The `rankfold` command line: fills a config and calls the pipeline. Heavy imports stay inside
the commands so `rankfold --help` and every command's --help load no torch; every RankfoldError
becomes one line and exit code 1. `compress`'s options come from the table in options.py."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.models import OptionInfo

from rankfold.converter.options import (
    DEPLOYMENT,
    MODEL,
    OPTIONS,
    OUTPUT,
    RANKS,
    RECOVERY,
    SELECTION,
    int_list,
    overrides,
)
from rankfold.converter.options import input_shape as parse_shape
from rankfold.converter.presets import describe, preset_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # Docstring lines are joined into paragraphs (in "rich" mode each source line break stays,
    # and a re-wrapped paragraph breaks mid-sentence).
    rich_markup_mode="markdown",
    help="Compress trained CNNs with low-rank tensor decompositions; export and validate ONNX.",
)

ModelArg = Annotated[
    str,
    typer.Argument(
        help="resnet20|32|44|56|110, digits-cnn, torchvision:NAME, "
        "torchvision:segmentation.NAME, torchvision:detection.NAME.backbone, or "
        "path/to/file.py:factory (see `rankfold models`)"
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


DEBUG_ENV = "RANKFOLD_DEBUG"


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _friendly(func):
    """Turn rankfold's typed errors into one line on stderr and exit code 1; an unexpected
    error is one line too (a bug to report), with its traceback under --debug."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from rankfold.passes.core import RankfoldError

        try:
            return func(*args, **kwargs)
        except RankfoldError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(code=1) from None
        except typer.Exit:  # an exit code the command chose, after saying why
            raise
        except KeyboardInterrupt as exc:
            # A command that writes says what it left in the message it raises with.
            left = f"; {exc.args[0]}" if exc.args else ""
            typer.secho(f"interrupted{left}", fg="yellow", err=True)
            raise typer.Exit(code=130) from None
        except Exception as exc:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            first = (str(exc).splitlines() or [""])[0]
            typer.secho(
                f"error: internal error ({type(exc).__name__}: {first}); rerun with "
                "`rankfold --debug …` for the traceback and report it",
                fg="red",
                err=True,
            )
            raise typer.Exit(code=1) from None

    return wrapper


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

    from rankfold.converter.summary import functional_notes
    from rankfold.converter.ui import console
    from rankfold.models import load_model
    from rankfold.passes.capture import trace_or_capture
    from rankfold.passes.core import atomic_write_json

    shape = None if input_shape is None else parse_shape(input_shape)
    net, spec = load_model(model, weights, shape)
    captured = trace_or_capture(net, torch.zeros(1, *spec.input_shape), leaf or [])
    result = captured.analysis
    if not captured.traced:
        console.print(
            f"[yellow]capture path: {captured.fx_error.problem}; layers found with forward "
            "hooks[/yellow]"
        )
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
    for note in functional_notes(result.functional):  # MACs the rows above do not hold
        console.print(note, soft_wrap=True)
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


ModelOpt = Annotated[
    str | None,
    typer.Argument(
        help="resnet20|32|44|56|110, digits-cnn, torchvision:NAME, "
        "torchvision:segmentation.NAME, torchvision:detection.NAME.backbone, or "
        "path/to/file.py:factory (see `rankfold models`; default: the --config file's model).",
        metavar="MODEL",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(help="YAML/JSON config; options override it.", rich_help_panel=MODEL),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        help=f"Named settings below --config and the options. {describe()}.",
        rich_help_panel=MODEL,
    ),
]
PrintConfigOpt = Annotated[
    str | None,
    typer.Option(
        help="Write the effective config (YAML, defaults included) to PATH, or - for stdout, "
        "and exit without compressing; --config on it repeats the run.",
        metavar="PATH",
        rich_help_panel=OUTPUT,
    ),
]
OutOpt = Annotated[Path, typer.Option(help="Output directory.", rich_help_panel=OUTPUT)]
PANELS = (MODEL, RANKS, SELECTION, RECOVERY, DEPLOYMENT, OUTPUT)


def _panel(parameter: inspect.Parameter) -> str:
    info = next(m for m in parameter.annotation.__metadata__ if isinstance(m, OptionInfo))
    return info.rich_help_panel


def _with_options(func: Callable[..., None]) -> Callable[..., None]:
    """One keyword parameter per row of OPTIONS, so typer makes each flag from the table; the
    keyword parameters are ordered by panel, which is the order the help shows the panels in."""
    signature = inspect.signature(func, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    generated = [
        inspect.Parameter(
            option.param,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                (list[option.kind] if option.many else option.kind) | None,
                typer.Option(
                    *option.decls,
                    help=option.help,
                    rich_help_panel=option.panel,
                    show_default=False,
                ),
            ],
        )
        for option in OPTIONS
    ]
    positional = [p for p in fixed if p.kind is not p.KEYWORD_ONLY]
    keyword = sorted(
        [*(p for p in fixed if p.kind is p.KEYWORD_ONLY), *generated],
        key=lambda p: PANELS.index(_panel(p)),
    )
    func.__signature__ = signature.replace(parameters=[*positional, *keyword])
    return func


@app.command()
@_friendly
@_with_options
def compress(
    model: ModelOpt = None,
    *,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    print_config: PrintConfigOpt = None,
    out: OutOpt = Path("out"),
    **values: Any,
) -> None:
    """Decompose MODEL, export original and compressed ONNX, validate, and write a report.

    Each option sets one config path, e.g. --gate-margin sets latency.gate_margin.

    Settings merge as --preset < --config < options."""
    from rankfold.converter.config import build_config, effective, layered, load_config_file
    from rankfold.passes.core import ConfigError, atomic_write_text

    merged = layered(
        preset_settings(preset) if preset is not None else {},
        load_config_file(config) if config is not None else {},
        {"model": model, **overrides(values)},
    )
    if merged.get("model") is None:
        raise ConfigError("give MODEL, or a --config file that names its model")
    settings = build_config(merged, source=f"{config} and the options" if config else "options")
    if print_config is not None:
        import yaml

        text = yaml.safe_dump(effective(settings), sort_keys=False, allow_unicode=True)
        if print_config == "-":
            sys.stdout.write(text)
        else:
            atomic_write_text(print_config, text)
        return
    from rankfold.converter.finetune import LAST_CHECKPOINT
    from rankfold.converter.pipeline import run_compress
    from rankfold.converter.results import Report
    from rankfold.converter.summary import print_summary
    from rankfold.passes.core import ValidationError

    started = time.time()
    try:
        result = run_compress(settings, out)
    except ValidationError:
        # Parity or INT8 agreement failed after the run was published: its summary first.
        report = out / "report.json"
        if report.is_file() and report.stat().st_mtime >= started:
            print_summary(Report.load(report), out)
        raise
    except KeyboardInterrupt:
        left = "the output folder still holds its previous complete run"
        checkpoint = out / "checkpoints" / LAST_CHECKPOINT
        if checkpoint.is_file() and checkpoint.stat().st_mtime >= started:
            left += f"; the fine-tuning continues from {checkpoint} with --resume"
        raise KeyboardInterrupt(left) from None
    if result.report is None:
        return  # a torchrun rank other than 0: that rank reports
    print_summary(result.report, out)
    latency = result.report.latency
    if settings.latency.fail_if_slower and latency is not None and latency.slower:
        raise ValidationError(
            f"the compressed model is measurably slower than the original ({out}/report.json, "
            "latency.per_batch); plan with the latency gate or a smaller reduction"
        )


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
    atol: Annotated[float, typer.Option(help="Parity tolerance, absolute.")] = 1e-4,
    rtol: Annotated[
        float, typer.Option(help="Parity tolerance relative to the largest output.")
    ] = 1e-5,
) -> None:
    """Check an exported model: ONNX checker, parity with the PyTorch model beside it, accuracy.
    The results go to stdout, one `key: value` line each; a failed parity check exits 1."""
    from rankfold.converter.validation import validate_export
    from rankfold.passes.core import ConfigError
    from rankfold.runtime.validate import parity_error

    if eval_limit is not None and eval_data is None:
        raise ConfigError("--eval-limit is read with --eval-data; add it or drop --eval-limit")
    result, parity = validate_export(onnx_path, eval_data, model, eval_limit, provider, atol, rtol)
    for key, value in result.items():
        typer.echo(f"{key}: {value}")
    if parity is not None and not parity.passed:
        raise parity_error(parity)


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
        str | None,
        typer.Option(help="Intra-op threads, e.g. 1 or 1,2: one table row each (default: all)."),
    ] = None,
    macs_reduction: Annotated[
        float | None,
        typer.Option(help="MAC reduction to relate speed to (default: counted in both files)."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the table as JSON.")
    ] = None,
    int8: Annotated[
        Path | None,
        typer.Option(
            help="The compressed model's INT8 file (model.int8.onnx), with --baseline-int8."
        ),
    ] = None,
    baseline_int8: Annotated[
        Path | None,
        typer.Option(help="The original's INT8 file (original.int8.onnx), with --int8."),
    ] = None,
) -> None:
    """Latency of the compressed vs the original ONNX model, side by side, per provider.

    Columns: threads, batch, original ms, compressed ms, speedup with the interval of its
    per-block speedups ("no measurable difference" when that holds 1), MAC reduction, and
    speedup / MAC reduction (1.0: every saved MAC saved time). With --int8 and --baseline-int8
    the four models run side by side and the INT8 times, the INT8 speedup (compressed INT8 vs
    original INT8) and float original / INT8 compressed follow."""
    from rich.table import Table

    from rankfold.converter.ui import console, progress_bar
    from rankfold.converter.validation import onnx_input_shape, onnx_output_shapes
    from rankfold.passes.core import ConfigError, ExportError, ProviderError, atomic_write_json
    from rankfold.runtime.latency import (
        BENCH_COLUMNS,
        INT8_BENCH_COLUMNS,
        bench_providers,
        format_bench_row,
    )

    sizes = int_list(batch)
    counts: list[int | None] = [None] if threads is None else list(int_list(threads, "--threads"))
    providers = [p.strip().lower() for p in provider.split(",") if p.strip()]
    if (int8 is None) != (baseline_int8 is None):
        raise ConfigError(
            "--int8 and --baseline-int8 go together: pass model.int8.onnx and original.int8.onnx"
        )
    shape, outputs = onnx_input_shape(onnx_path), onnx_output_shapes(onnx_path)
    others = [("--baseline", baseline)]
    if int8 is not None:
        others += [("--int8", int8), ("--baseline-int8", baseline_int8)]
    for flag, other in others:  # every file is checked before any timing
        if onnx_input_shape(other) != shape:
            raise ExportError(
                f"{flag} {other} takes inputs of shape {onnx_input_shape(other)} but "
                f"{onnx_path} takes {shape}; compare exports of the same model"
            )
        if (theirs := onnx_output_shapes(other)) != outputs:
            raise ExportError(
                f"{flag} {other} has outputs of shapes {theirs} but {onnx_path} {outputs}; "
                "compare exports of the same model"
            )
    models = 2 if int8 is None else 4
    runs = len(providers) * len(counts) * len(sizes) * models * repeats
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
            threads=counts,
            progress=lambda _: advance(),
            int8=None if int8 is None else (baseline_int8, int8),
        )
    for name, result in data["providers"].items():
        if "skipped" in result:
            console.print(f"{name}: skipped ({result['skipped']})")
            continue
        tables = [(f"{onnx_path} vs {baseline} ({name})", BENCH_COLUMNS)]
        if int8 is not None:
            tables.append((f"{int8} vs {baseline_int8} ({name}, INT8)", INT8_BENCH_COLUMNS))
        for title, columns in tables:
            table = Table(title=title)
            for _, header, _ in columns:
                table.add_column(header, justify="right")
            for row in result["rows"]:
                table.add_row(*format_bench_row(row, columns))
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
    """List the decomposition methods, plug-ins included (and any that failed to load)."""
    from rankfold.passes.methods import METHODS

    _list_plugins(
        METHODS,
        lambda method: (
            f"({', '.join(method.rank_names)}) {_first_line(method)} "
            f"[{', '.join(method.layer_types)}]"
            + (" The refit refines its segments by default." if method.refines_segments else "")
            + (
                f" Budgets are planned by {method.budget_selector} unless --select says otherwise."
                if method.budget_selector != "uniform"
                else ""
            )
        ),
    )


@app.command()
@_friendly
def models() -> None:
    """List the model names and forms the MODEL argument takes."""
    from rankfold.models.zoo import TASK_EXAMPLES, TORCHVISION_EXAMPLES, registered_specs

    for name, spec in registered_specs().items():
        typer.echo(f"{name}  {spec.description}")
    typer.echo(
        "torchvision:NAME  any torchvision classifier (torchvision.models.list_models()), "
        f"e.g. {', '.join(TORCHVISION_EXAMPLES[:3])}"
    )
    typer.echo(
        "torchvision:segmentation.NAME  a torchvision segmentation model (fcn_*, deeplabv3_*, "
        "lraspp_*), returning {out, aux} (LR-ASPP: {out}); no top-1: --eval-data is refused, "
        f"score it with the Python API's metric=; e.g. {TASK_EXAMPLES[0]}"
    )
    typer.echo(
        "torchvision:detection.NAME.backbone  a torchvision detector's backbone (its feature "
        f"maps by name; the heads are not compressed), e.g. {TASK_EXAMPLES[2]}"
    )
    typer.echo(
        "path/to/file.py:factory  your own model: factory() returns the nn.Module; the file "
        "defines RANKFOLD_SPEC or you pass --input-shape"
    )


@app.command()
@_friendly
def selectors() -> None:
    """List the rank selectors (--select), plug-ins included (and any that failed to load)."""
    from rankfold.passes.selectors import SELECTORS

    _list_plugins(SELECTORS, lambda selector: selector.summary)


def _first_line(item: object) -> str:
    return ((type(item).__doc__ or "").strip().splitlines() or [""])[0]


def _list_plugins(registry, describe) -> None:
    """One line per registered plug-in on stdout, then one per plug-in that failed to load."""
    for name, item in registry.items():
        typer.echo(f"{name} {describe(item)}")
    for name, reason in registry.errors.items():
        typer.echo(f"{name} (not loaded: {reason})")


@app.command()
@_friendly
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/demo"),
    epochs: Annotated[int, typer.Option(help="Training epochs for the digits CNN.")] = 3,
    method: Annotated[str, typer.Option(help="Decomposition method.")] = "tucker2",
    macs_reduction: Annotated[float, typer.Option(help="MAC reduction target.")] = 3.0,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 2,
    latency_gate: Annotated[
        bool,
        typer.Option(
            "--latency-gate/--no-latency-gate",
            help="Keep layers whole whose block is not faster in onnxruntime.",
        ),
    ] = True,
    threads: Annotated[
        str | None,
        typer.Option(help="Intra-op threads to time at, e.g. 1 or 1,2 (default: all cores)."),
    ] = None,
) -> None:
    """Offline demo: train a CNN on scikit-learn's digits, compress, fine-tune, export, validate."""
    from rankfold.converter.demo import run_demo
    from rankfold.converter.summary import print_summary

    report = run_demo(
        out,
        epochs=epochs,
        method=method,
        macs_reduction=macs_reduction,
        finetune_epochs=finetune_epochs,
        latency_gate=latency_gate,
        threads=None if threads is None else int_list(threads, "--threads"),
    )
    print_summary(report, out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
