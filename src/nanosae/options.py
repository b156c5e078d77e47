"""Command-line options generated from the config dataclasses: one flag per field, its help the field's
docstring, its default the field's default, so a config and its command's `--help` cannot drift apart.

A field's flag is its name with dashes (`d_sae` -> `--d-sae`); `metadata={"flag": ...}` names it otherwise
and `metadata={"aliases": [...]}` keeps older spellings working. Nested parts (TrainConfig.source / sae /
optim) and DataConfig are flattened: their names are unique across a command, as TrainConfig.build needs.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from nanosae.config import LITERALS, PARTS, DataConfig
from nanosae.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One command-line setting: the field it fills and how its text is read."""

    name: str
    """The field's name (and the keyword the command receives)."""
    kind: str
    """bool, count (an int: 4096, 200k, 2M), number (a float), text, repeat (list[str]), ints (comma list)."""
    default: Any
    flags: tuple[str, ...]
    help: str
    optional: bool = False
    """None is a valid value (the field's default is derived later)."""
    sweep: bool = False
    """Several comma-separated values train together."""
    required: bool = False
    """The command cannot run without it (metadata={"required": True})."""
    envvar: str | None = None
    """An environment variable read when the flag is not given (metadata={"envvar": ...})."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal after its annotation)."""
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(node, ast.ClassDef)
    body = node.body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _fields(cls: type) -> list[tuple[type, dataclasses.Field, Any]]:
    """(owner class, field, default) of every setting, nested parts and DataConfig flattened; a DataConfig's
    defaults are those of the instance its parent makes (evaluation reads the eval split by default)."""
    out = []
    for f in dataclasses.fields(cls):
        part = PARTS.get(f.name) if f.type == getattr(PARTS.get(f.name), "__name__", None) else None
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if part is not None:
            out += _fields(part)
        elif f.type == "DataConfig":
            out += [(DataConfig, g, getattr(default, g.name)) for g in dataclasses.fields(DataConfig)]
        else:
            out.append((cls, f, default))
    return out


def options_for(
    cls: type, sweep: tuple[str, ...] = (), repeat: tuple[str, ...] = (), skip: tuple[str, ...] = ()
) -> list[Option]:
    """The options of a config class: `sweep` fields take comma-separated values, `repeat` fields may be given
    several times (both then arrive as lists), `skip` fields are left out."""
    out = []
    for owner, f, default in _fields(cls):
        if f.name in skip:
            continue
        alts = [a.strip() for a in f.type.split("|")]
        base = next(a for a in alts if a != "None")
        kind = {"bool": "bool", "int": "count", "float": "number", "list[str]": "repeat", "list[int]": "ints"}.get(
            base, "text"
        )
        if f.name in repeat:
            kind = "repeat"
        flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        flags = (f"{flag}/--no-{flag[2:]}",) if kind == "bool" else (flag, *f.metadata.get("aliases", ()))
        help_text = field_docs(owner).get(f.name, "")
        if base in LITERALS and not help_text:
            help_text = "one of " + ", ".join(get_args(LITERALS[base]))
        out.append(
            Option(
                f.name,
                kind,
                default,
                flags,
                help_text,
                "None" in alts or f.metadata.get("derived", False),
                f.name in sweep,
                f.metadata.get("required", False),
                f.metadata.get("envvar"),
            )
        )
    return out


def signature(options: list[Option], extra: Sequence[inspect.Parameter] = ()) -> inspect.Signature:
    """A typer-readable signature: bools as --x/--no-x switches, lists as repeatable options, the rest as text
    (read by `parse`, so counts like 200k and sweeps like 2304,4608 work and errors are nanosae's one line)."""
    import typer
    from rich.markup import escape

    params = []
    for o in options:
        annotation: Any
        if o.kind == "bool":
            annotation, default = bool, o.default
        elif o.kind == "repeat":
            annotation = list[str]
            default = None if o.default is None else list(o.default) if isinstance(o.default, list) else [o.default]
        else:
            annotation = str
            default = (
                None
                if o.default is None
                else ",".join(map(str, o.default))
                if isinstance(o.default, list)
                else str(o.default)
            )
        metavar = {"count": "N", "number": "X", "ints": "N,N,...", "repeat": "TEXT"}.get(o.kind, "TEXT")
        if o.sweep:
            metavar = "V[,V,...]"
        params.append(
            inspect.Parameter(
                o.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=annotation,
                default=typer.Option(
                    ... if o.required else default,
                    *o.flags,
                    help=escape(o.help),
                    envvar=o.envvar,
                    metavar=None if o.kind == "bool" else metavar,
                ),
            )
        )
    positional = [p for p in extra if p.kind != inspect.Parameter.KEYWORD_ONLY]  # arguments come first
    return inspect.Signature(positional + params + [p for p in extra if p not in positional])


def parse(options: list[Option], given: dict[str, Any]) -> dict[str, Any]:
    """Typed values from the command's keyword arguments (sweep fields as lists of values)."""
    out = {}
    for o in options:
        value = given.get(o.name)
        if value is None or o.kind in ("bool", "repeat"):
            out[o.name] = list(value) if o.kind == "repeat" and value is not None else value
            continue
        if o.optional and str(value).strip().lower() == "none":
            out[o.name] = None
            continue
        read = lambda text: _read(o, text)
        if o.sweep:
            out[o.name] = [read(v) for v in str(value).split(",") if v.strip()]
        elif o.kind == "ints":
            out[o.name] = [parse_count(v, o.flags[0]) for v in str(value).split(",") if v.strip()]
        else:
            out[o.name] = read(value)
    return out


def _read(o: Option, text: str) -> Any:
    if o.kind == "count":
        return parse_count(text, o.flags[0])
    if o.kind == "number":
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{o.flags[0]}: cannot read {text!r} as a number") from None
    return text.strip()


def parse_count(text: str, option: str = "") -> int:
    """'200k' -> 200000, '2M' -> 2000000, '4096' -> 4096; anything else is a one-line error naming the option."""
    units = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
    t = str(text).strip().lower().replace("_", "")
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except (ValueError, KeyError):
        value = math.nan
    if not (math.isfinite(value) and value == int(value)):
        where = f"{option}: " if option else ""
        raise ConfigError(f"{where}cannot read {text!r} as a whole count (expected e.g. 4096, 200k, 2M)")
    return int(value)


def command(options: list[Option], extra: Sequence[inspect.Parameter] = ()) -> Callable[[Callable], Callable]:
    """Give a `def cmd(**settings)` function the generated signature (apply before @app.command())."""

    def wrap(fn: Callable) -> Callable:
        fn.__signature__ = signature(options, extra)  # type: ignore[attr-defined]  # inspect and typer read it
        return fn

    return wrap


def gather_data(settings: dict[str, Any]) -> dict[str, Any]:
    """Move DataConfig's flattened fields back into one DataConfig under "data" (fields left unset keep
    DataConfig's defaults)."""
    names = {f.name for f in dataclasses.fields(DataConfig)}
    data = {k: settings.pop(k) for k in list(settings) if k in names}
    settings["data"] = DataConfig(**{k: v for k, v in data.items() if v is not None})
    return settings
