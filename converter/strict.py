"""Turn pydantic validation errors into one-line ConfigErrors, with a did-you-mean for typos."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from rankfold.passes.core import ConfigError


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at a location like ('ranks', 'layers', 'conv1')."""
    current: Any = model
    for part in loc[:-1]:
        if (
            isinstance(current, type)
            and issubclass(current, BaseModel)
            and part in current.model_fields
        ):
            annotation = current.model_fields[part].annotation
            args = getattr(annotation, "__args__", ())
            current = next(
                (
                    a
                    for a in (annotation, *args)
                    if isinstance(a, type) and issubclass(a, BaseModel)
                ),
                annotation,
            )
            if getattr(annotation, "__origin__", None) is dict:
                current = args[1]
        elif current is not None and getattr(current, "__origin__", None) is dict:
            current = current.__args__[1]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def config_error(
    exc: ValidationError,
    model: type[BaseModel],
    source: str,
    moved: dict[str, str] | None = None,
    flags: dict[str, str] | None = None,
) -> ConfigError:
    """One line for the first problem, with a did-you-mean for unrecognised keys (`moved`: old
    dotted key → its new place; `flags`: dotted key → the command-line flag that sets it)."""
    # A misspelt key also shows up as a missing one: report the misspelling.
    error = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden" and moved and where in moved:
        return ConfigError(f"{source}: unrecognised key '{where}' — it moved to '{moved[where]}'")
    if error["type"] == "extra_forbidden":
        valid = _fields_at(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" — did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
        return ConfigError(f"{source}: unrecognised key '{where}'{hint}")
    if error["type"] == "missing":
        return ConfigError(f"{source}: missing required setting '{where}'")
    message = error["msg"].removeprefix("Value error, ")
    flag = (flags or {}).get(where)
    named = f"{flag} ({where})" if flag else f"'{where}'"
    return ConfigError(f"{source}: invalid value for {named}: {message}")
