"""Load a state dict from a checkpoint file into a model, refusing anything that does not fit.

Checkpoints come in several common wrappings (a bare state dict; `{"state_dict": ...}` as the
akamaster CIFAR ResNets; `{"model": ...}`, `{"model_state_dict": ...}`, `{"net": ...}`) and with
`module.` (DataParallel) or `_orig_mod.` (torch.compile) prefixes; all are accepted. Only
tensors are unpickled (`weights_only=True`), so loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from rankfold.passes.core import ModelLoadError

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# BatchNorm's step counter is absent from older checkpoints and never affects inference.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)
SHOWN = 3  # how many offending names an error message lists


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks so large checkpoints are not held twice in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored in `path`, unwrapped and with wrapper prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} not found; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names a refused class as "GLOBAL module.Class"; any other
        # unpickling failure means the bytes are not a valid pickle at all.
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:
            raise ModelLoadError(
                f"checkpoint {path.name} cannot be read (invalid pickle data); the file is "
                "corrupt or not a torch.save file"
            ) from None
        raise ModelLoadError(
            f"checkpoint {path.name} holds Python objects besides tensors ({found.group(1)}); "
            "save model.state_dict() instead"
        ) from None
    # torch's unpickler meets corrupt bytes with whatever its parser trips over (a bit flip in a
    # real checkpoint gave IndexError, KeyError and AssertionError).
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        IndexError,
        KeyError,
        AssertionError,
        TypeError,
        AttributeError,
        UnicodeDecodeError,
    ) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"checkpoint {path.name} cannot be read ({reason}); the file is corrupt or not a "
            "torch.save file"
        ) from None
    return _strip_prefixes(_unwrap(obj, path))


def load_weights(
    model: nn.Module, path: str | Path, model_name: str, sha256: str | None = None
) -> None:
    """Load `path` into `model` in place: same keys, same shapes, finite values, or ModelLoadError.

    `sha256`, when given, must equal the file's hex digest (an optional integrity check for
    known files); `model_name` names the model in error messages.
    """
    path = Path(path)
    if sha256 is not None and path.is_file():
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise ModelLoadError(
                f"checkpoint {path.name} has sha256 {actual[:12]}…, expected {sha256[:12]}…; "
                "replace it with the original file"
            )
    state = read_state_dict(path)
    target = model.state_dict()
    check_state_dict(state, target, path.name, model_name)
    for key in target:
        if key not in state and key.endswith(OPTIONAL_SUFFIXES):
            state[key] = target[key]
    model.load_state_dict(state, strict=True)


def check_finite(model: nn.Module) -> None:
    """Raise ModelLoadError naming the first parameter or buffer holding NaN or infinity."""
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelLoadError(
                f"model {type(model).__name__} has NaN or infinite values in {name}; "
                "its weights are corrupt, load a checkpoint saved before training diverged"
            )


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    source: str,
    model_name: str,
) -> None:
    """Raise ModelLoadError unless `state` has exactly `target`'s keys and shapes, all finite."""
    hint = f"it does not match model '{model_name}'; pass weights saved from that architecture"
    missing = [k for k in target if k not in state and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in target]
    problems = []
    if missing:
        problems.append(f"is missing {_names(missing)}")
    if unexpected:
        problems.append(f"has {_names(unexpected, 'unexpected key')}")
    if problems:
        raise ModelLoadError(f"checkpoint {source} {' and '.join(problems)}; {hint}")
    wrong = [
        f"{k} {tuple(state[k].shape)} in checkpoint vs {tuple(target[k].shape)} in model"
        for k in target
        if k in state and state[k].shape != target[k].shape
    ]
    if wrong:
        raise ModelLoadError(f"checkpoint {source} has {_names(wrong, 'mis-shaped key')}; {hint}")
    bad = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise ModelLoadError(
            f"checkpoint {source} has NaN or infinite values in {_names(bad, 'tensor')}; "
            "the weights are corrupt, use a checkpoint saved before training diverged"
        )


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        return dict(obj)  # type: ignore[arg-type]
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise ModelLoadError(
            f"checkpoint {path.name} is a dict without a state dict (top-level keys: {keys}); "
            f"store the weights at the top level or under one of {', '.join(WRAPPER_KEYS)}"
        )
    raise ModelLoadError(
        f"checkpoint {path.name} holds a {type(obj).__name__}, not a state dict; "
        "save model.state_dict() instead"
    )


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Strip only a prefix shared by every key, so a real submodule named `module` survives.
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _names(items: list[str], what: str = "key") -> str:
    plural = "s" if len(items) != 1 else ""
    shown = ", ".join(items[:SHOWN]) + (", …" if len(items) > SHOWN else "")
    return f"{len(items)} {what}{plural} ({shown})"
