"""Click options and command-line arguments derived from a pydantic settings model.

A setting is declared once, as a model field (type, default, bounds, `description`); its
flag, click type, range and help text are read from that field. A field whose flag or
click parameter is not the default (`--field-name`, parameter `field_name`, environment
variable `<PREFIX>_FIELD_NAME` through click's auto_envvar_prefix) says so with `Flag`
in its annotation, e.g. `slow_start_s: Annotated[float, Flag("--slow-start")]`.
"""

from __future__ import annotations

import enum
import math
import os
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import annotated_types
import click
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Flag:
    """A field's command-line spelling where it differs from the default one."""

    #: The flag, e.g. "--slow-start" (default: `--` and the field name with dashes).
    name: str | None = None
    #: The click parameter name, which also names the environment variable.
    param: str | None = None
    #: The click type, where the field's own type is not what the command line takes
    #: (e.g. a path or a keyword that the model's validator resolves).
    type: Any = None


class FiniteFloat(click.FloatRange):
    """A float option: NaN and the infinities are refused, then the range (if any) checked.

    click's FLOAT takes "nan" and "inf" (float() does), and a NaN passes every range
    check (each comparison is False); every float flag of `twlb` parses through this type.
    """

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        # Unbounded: no "[x<=None]" in the help.
        return "" if self.min is None and self.max is None else super()._describe_range()


class OutputPath(click.Path):
    """A file (or with `directory`, a directory) the command writes, creating missing
    parent directories: checked when the flags are read, so a long run cannot end unable
    to write what it did. The nearest existing ancestor must be a writable directory."""

    def __init__(self, directory: bool = False) -> None:
        super().__init__(file_okay=not directory, dir_okay=directory, path_type=Path)
        self.directory = directory

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = Path(super().convert(value, param, ctx))
        ancestor = path if self.directory else path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            self.fail(f"{value}: {ancestor} is not a directory", param, ctx)
        if not os.access(ancestor, os.W_OK | os.X_OK):
            self.fail(f"{value}: cannot write in {ancestor}", param, ctx)
        return path


def _flag_meta(field: FieldInfo) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def flag_name(name: str, field: FieldInfo) -> str:
    """The flag carrying field `name` (`--window` for `window_s` if so declared)."""
    return _flag_meta(field).name or "--" + name.replace("_", "-")


def param_name(name: str, field: FieldInfo) -> str:
    """The click parameter (and environment variable suffix) of field `name`."""
    return _flag_meta(field).param or name


def _bare(annotation: Any) -> tuple[Any, bool]:
    """The annotation without `| None`, and whether None was allowed."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _constraints(annotation: Any, field: FieldInfo) -> tuple[Any, list[Any]]:
    """The type under an `Annotated` (e.g. `Probability | None`, whose bounds pydantic
    leaves in the annotation) and every constraint of the field and of that annotation."""
    metadata = list(field.metadata)
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        for m in extra:
            metadata += m.metadata if isinstance(m, FieldInfo) else [m]
    return annotation, metadata


def _bounds(metadata: Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            out["min"] = m.ge
        elif isinstance(m, annotated_types.Gt):
            out["min"], out["min_open"] = m.gt, True
        elif isinstance(m, annotated_types.Le):
            out["max"] = m.le
        elif isinstance(m, annotated_types.Lt):
            out["max"], out["max_open"] = m.lt, True
    return out


def _click_type(annotation: Any, field: FieldInfo, ranges: bool) -> click.ParamType | type | None:
    annotation, metadata = _constraints(annotation, field)
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return click.Choice([str(e.value) for e in annotation])
    if annotation is Path:
        # Settings name files the process reads: they must exist when it starts.
        return click.Path(exists=True, dir_okay=False, path_type=Path)
    bounds = _bounds(metadata) if ranges else {}
    if annotation is int:
        return click.IntRange(**bounds) if bounds else int
    if annotation is float:
        return FiniteFloat(**bounds)
    return None  # str and anything else: click's default


_UNSET = object()


def _default(field: FieldInfo, value: Any = _UNSET) -> Any:
    if value is _UNSET:
        if field.default_factory is not None:
            return field.default_factory  # click calls it when the option is not given
        value = field.default
    if isinstance(value, enum.Enum):
        return value.value
    return value


def click_option(
    name: str, field: FieldInfo, ranges: bool = True, default: Any = _UNSET
) -> Callable[[F], F]:
    """The click option of one model field (a field without a default is a required
    option); `default` overrides the field's own, e.g. from another instance's value.

    With `ranges` off, numbers are plain int/float and the model alone checks bounds.
    """
    annotation, _ = _bare(field.annotation)
    flag = flag_name(name, field)
    kwargs: dict[str, Any] = {"default": _default(field, default), "help": field.description}
    if field.is_required() and default is _UNSET:
        kwargs = {"required": True, "help": field.description}
    elif field.default_factory is not None and default is _UNSET:
        kwargs["show_default"] = False  # computed when the command runs: the help says it
    if annotation is bool:
        decls = [f"{flag}/--no-{flag[2:]}"]
    else:
        decls = [flag]
        if typing.get_origin(annotation) is tuple:
            kwargs["multiple"] = True
            item = typing.get_args(annotation)[0]
            kwargs["type"] = _click_type(item, field, ranges)
        else:
            kwargs["type"] = _flag_meta(field).type or _click_type(annotation, field, ranges)
    return click.option(*decls, param_name(name, field), **kwargs)


def click_options(
    model: type[BaseModel],
    exclude: Iterable[str] = (),
    ranges: bool = True,
    defaults: BaseModel | None = None,
) -> Callable[[F], F]:
    """A decorator adding one click option per field of `model`, in declaration order;
    with `defaults` (an instance of `model`), its values are the options' defaults."""
    skip = set(exclude)
    options = [
        click_option(n, f, ranges, _UNSET if defaults is None else getattr(defaults, n))
        for n, f in model.model_fields.items()
        if n not in skip
    ]

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def field_values(
    model: type[BaseModel], options: dict[str, Any], exclude: Iterable[str] = ()
) -> dict[str, Any]:
    """Click's parameter values (as `click_options` named them) keyed by field name."""
    skip = set(exclude)
    return {n: options[param_name(n, f)] for n, f in model.model_fields.items() if n not in skip}


def build(model: type[M], ctx: click.Context, values: dict[str, Any]) -> M:
    """`model` from field values; a value the model refuses is a BadParameter naming its flag.

    A check across fields (no field in its location) is a usage error.
    """
    try:
        return model.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        first["msg"] = first["msg"].removeprefix("Value error, ")
        loc = first["loc"]
        fields = model.model_fields
        name = next((str(p) for p in loc if str(p) in fields), None)
        if name is None:
            alias = {f.alias: n for n, f in fields.items() if f.alias}
            name = alias.get(str(loc[0])) if loc else None
        if name is None:
            # A check across fields names the field it blames first in its message.
            msg = first["msg"]
            named = [
                (msg.find(spelling), -len(spelling), n)
                for n, f in fields.items()
                for spelling in {n, f.alias or n}
                if spelling in msg
            ]
            name = min(named)[2] if named else None
        if name is None:
            raise click.UsageError(first["msg"], ctx=ctx) from None
        param = next(p for p in ctx.command.params if p.name == param_name(name, fields[name]))
        # The command's one-line error names the environment variable when the value
        # came from one (twlb/exits.py).
        raise click.BadParameter(first["msg"], ctx, param) from None


def _arg(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def to_args(settings: BaseModel, exclude: Iterable[str] = ()) -> list[str]:
    """The flags that give a command `settings` (None values are left out)."""
    skip = set(exclude)
    args: list[str] = []
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if name in skip or value is None:
            continue
        flag = flag_name(name, field)
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, tuple):
            for item in value:
                args += [flag, _arg(item)]
        else:
            args += [flag, _arg(value)]
    return args


def to_env(settings: BaseModel, prefix: str, exclude: Iterable[str] = ()) -> dict[str, str]:
    """The environment variables (click auto_envvar, `prefix` e.g. "TWLB_BACKEND_") for
    `settings` (None values are left out; a tuple is space-separated)."""
    skip = set(exclude)
    env: dict[str, str] = {}
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if name in skip or value is None:
            continue
        key = prefix + param_name(name, field).upper()
        if isinstance(value, bool):
            env[key] = "1" if value else "0"
        elif isinstance(value, tuple):
            env[key] = " ".join(_arg(v) for v in value)
        else:
            env[key] = _arg(value)
    return env
