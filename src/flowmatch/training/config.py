"""Training configuration: ``TrainConfig`` and generic machinery for config dataclasses.

The machinery works on any (nested) dataclass whose fields are ``bool``, ``int``, ``float``,
``str``, ``Literal[...]``, ``tuple[...]``, ``X | None`` or another dataclass, so a command line can
compose a top-level config of data / model / objective / train sections:

- ``apply_overrides(config, ["lr=1e-3", "model.hidden=128"])`` parses ``key=value`` strings
  against the field types and returns a new config;
- ``config_to_dict`` / ``config_from_dict`` convert to and from JSON-ready dicts.

Wrong keys, types or values raise ``ConfigError`` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, TypeGuard, TypeVar

import torch

from flowmatch.training.loggers import LOGGERS, missing_package

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration key, type or value is invalid (the message is one line)."""


def _free(default: Any) -> Any:
    """A field that a resumed run may change: it does not alter the stream of updates."""
    return field(default=default, metadata={RESUMABLE: True})


RESUMABLE = "may_change_on_resume"
MAX_SEED = 2**63 - 1
MAX_STEPS = 2**40
MAX_BATCH = 2**24


@dataclass(frozen=True)
class TrainConfig:
    """Everything the training loop needs to know, none of it about the model or the objective.

    ``batch_size`` is global: each step draws ``batch_size / micro_batch_size`` micro-batches,
    spread over the processes, and accumulates their gradients. Without ``micro_batch_size``
    each process takes one micro-batch of ``batch_size / world_size``; fix it to draw the same
    random stream on any number of processes.
    """

    seed: int = 0
    steps: int = 1000
    batch_size: int = 256
    micro_batch_size: int | None = None  # None: batch_size / number of processes
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "poly"] = "constant"
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + k) / (10 + k)) at step k
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    # Several processes: ddp replicates the model; fsdp shards parameters, gradients, optimizer
    # state and EMA over the processes (FSDP2) and writes sharded checkpoints.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    log_every: int = _free(100)
    checkpoint_every: int = _free(1000)
    keep_checkpoints: int | None = _free(3)  # None: keep all
    val_every: int | None = _free(None)  # None: validate at every logging step
    device: str = _free("auto")  # auto: the local CUDA device if there is one, else cpu
    num_threads: int | None = _free(None)  # torch.set_num_threads; None: torch's default
    # Draw and prepare the next step's micro-batches (data, noise, OT coupling) in a background
    # thread while this step trains; the same numbers either way.
    prefetch: bool = _free(False)
    loggers: tuple[str, ...] = _free(())  # beside metrics.jsonl: csv, tensorboard (loggers.py)

    def __post_init__(self) -> None:
        check_range("seed", self.seed, 0, MAX_SEED)
        check_range("steps", self.steps, 1, MAX_STEPS)
        check_range("batch_size", self.batch_size, 1, MAX_BATCH)
        for name in ("log_every", "checkpoint_every"):
            check_range(name, getattr(self, name), 1, MAX_STEPS)
        for name in ("micro_batch_size", "keep_checkpoints", "val_every", "num_threads"):
            check_range(name, getattr(self, name), 1, MAX_STEPS, optional=True)
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}"
            )
        check_range("lr", self.lr, 0.0, math.inf, low_open=True)
        check_range("eps", self.eps, 0.0, math.inf, low_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, math.inf)
        for beta in self.betas:
            check_range("betas", beta, 0.0, 1.0, high_open=True)
        check_range("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        check_range("warmup_steps", self.warmup_steps, 0, self.steps)
        check_range("grad_clip", self.grad_clip, 0.0, math.inf, low_open=True, optional=True)
        check_device_name(self.device)
        for name in self.loggers:
            if name not in LOGGERS:
                raise ConfigError(f"loggers: {name!r} is not one of {', '.join(LOGGERS)}")
            hint = missing_package(name)
            if hint is not None:
                raise ConfigError(hint)

    def micro_size(self, world_size: int = 1) -> int:
        """The micro-batch size used on ``world_size`` processes; ``ConfigError`` when the
        global batch does not split into whole micro-batches over them."""
        size = self.micro_batch_size or self.batch_size // world_size
        if size < 1 or (self.batch_size // size) % world_size or self.batch_size % size:
            raise ConfigError(
                f"train.batch_size {self.batch_size} in micro-batches of "
                f"{self.micro_batch_size or 'batch_size / processes'} does not split over "
                f"{world_size} processes; choose a batch_size (or train.micro_batch_size) so that "
                "batch_size / micro_batch_size is a multiple of the number of processes"
            )
        return size


def check_range(
    name: str,
    value: float | None,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """``ConfigError`` unless ``value`` is a finite number in the interval (or None, if
    ``optional``)."""
    if value is None and optional:
        return
    ok = (
        isinstance(value, int | float)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        left = "(" if low_open or low == -math.inf else "["
        right = ")" if high_open or high == math.inf else "]"
        suffix = " or None" if optional else ""
        raise ConfigError(f"{name} must lie in {left}{low:g}, {high:g}{right}{suffix}, got {value}")


def check_device_name(device: str) -> None:
    """``ConfigError`` unless ``device`` is ``auto`` or a device string torch can parse."""
    if device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"device must be auto, cpu, cuda, cuda:N or another torch device, got {device!r}"
        ) from None


def resolve_device(device: str) -> torch.device:
    """The device ``device`` names on this machine (``auto``: CUDA if there is one, else CPU);
    ``ConfigError`` for a device this build of torch or this machine does not have."""
    check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cpu":
        return resolved
    backend = getattr(torch, resolved.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ConfigError(f"device {device!r} is not available here (torch {torch.__version__})")
    if resolved.index is not None and resolved.index >= backend.device_count():
        raise ConfigError(f"device {device!r}: this machine has {backend.device_count()}")
    return resolved


def may_change_on_resume(cls: type, prefix: str = "") -> set[str]:
    """The dotted keys of the (nested) config dataclass ``cls`` that a resumed run may change."""
    keys: set[str] = set()
    for f in fields(cls):
        kind = _field_types(cls)[f.name]
        if _is_section(kind):
            keys |= may_change_on_resume(kind, f"{prefix}{f.name}.")
        elif f.metadata.get(RESUMABLE):
            keys.add(prefix + f.name)
    return keys


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass; tuples become lists."""

    def plain(value: Any) -> Any:
        if is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return plain(config)


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build ``cls`` from a dict such as ``config_to_dict`` returns; missing keys take defaults.

    Unknown keys and values of the wrong type raise ``ConfigError``.
    """
    return _from_dict(cls, data, prefix="")


def apply_overrides(config: C, overrides: list[str]) -> C:
    """A copy of ``config`` with each ``"dotted.key=value"`` applied, parsed by the field's type.

    Tuples are written ``0.9,0.999``; ``none`` sets an optional field to None. All overrides of
    a section are applied at once, so checks that relate two keys do not depend on their order.
    """
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _parse_override(type(config), key.strip().split("."), text.strip(), "", changes)
    return _apply(config, changes, prefix="")


def _parse_override(
    cls: type, path: list[str], text: str, prefix: str, changes: dict[str, Any]
) -> None:
    """Parse one override of ``cls`` into the nested dict ``changes``."""
    types_ = _field_types(cls)
    head = path[0]
    if head not in types_:
        raise _unknown(head, prefix, types_)
    kind = types_[head]
    name = prefix + head
    if _is_section(kind):
        if len(path) == 1:
            raise ConfigError(f"{name} is a section; set one of its keys as {name}.<key>=value")
        inner = changes.setdefault(head, {})
        _parse_override(kind, path[1:], text, name + ".", inner)
    elif len(path) > 1:
        raise ConfigError(f"{name} is not a section; cannot set {'.'.join([name, *path[1:]])}")
    else:
        changes[head] = _parse(text, kind, name)


def _apply(config: Any, changes: dict[str, Any], prefix: str) -> Any:
    """``config`` with the nested ``changes``, each section rebuilt once."""
    values = {
        key: _apply(getattr(config, key), value, f"{prefix}{key}.")
        if isinstance(value, dict)
        else value
        for key, value in changes.items()
    }
    return _replace(config, prefix, **values) if values else config


def _is_section(kind: Any) -> TypeGuard[type]:
    """Whether the field type ``kind`` is a nested config dataclass (a class, not an instance)."""
    return isinstance(kind, type) and is_dataclass(kind)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.init}


def _unknown(key: str, prefix: str, valid: dict[str, Any]) -> ConfigError:
    where = f" in {prefix.rstrip('.')}" if prefix else ""
    return ConfigError(f"unknown key {prefix + key!r}; valid keys{where}: {', '.join(valid)}")


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    values = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown(key, prefix, types_)
        kind = types_[key]
        if _is_section(kind):
            values[key] = _from_dict(kind, value, prefix + key + ".")
        else:
            values[key] = _coerce(value, kind, prefix + key)
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{prefix}{error}" if prefix else str(error)) from None


def _replace(config: Any, prefix: str, **changes: Any) -> Any:
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError as error:
        raise ConfigError(f"{prefix}{error}" if prefix else str(error)) from None


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(kind)))
    args = typing.get_args(kind)
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1 and len(args) == 2 and typing.get_origin(inner[0]) is Literal:
        return _describe(inner[0]) + " (none: the default)"
    return str(kind).replace("typing.", "") if not isinstance(kind, type) else kind.__name__


def _bad(name: str, kind: Any, value: Any) -> ConfigError:
    return ConfigError(f"{name} must be {_describe(kind)}, got {value!r}")


def _parse(text: str, kind: Any, name: str) -> Any:
    """The value of type ``kind`` written as ``text`` on a command line."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _parse(text, inner, name)
        except ConfigError:
            raise _bad(name, kind, text) from None
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise _bad(name, kind, text)
    if origin is tuple:
        parts = [p.strip() for p in text.strip("()[] ").split(",") if p.strip()]
        item_types = _item_types(kind, len(parts), name)
        try:
            return tuple(_parse(p, k, name) for p, k in zip(parts, item_types, strict=True))
        except ConfigError:
            raise _bad(name, kind, text) from None
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise _bad(name, kind, text)
    if kind is int:
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)  # "1e5" is a common way to write a step count
            except ValueError:
                raise _bad(name, kind, text) from None
            if not number.is_integer():
                raise _bad(name, kind, text) from None
            return int(number)
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise _bad(name, kind, text) from None
    if kind is str:
        return text
    raise ConfigError(f"{name} has a field type {kind!r} that configs do not support")


def _item_types(kind: Any, count: int, name: str) -> tuple:
    """The types of ``count`` entries of a tuple type; ``ConfigError`` if it has another length."""
    args = typing.get_args(kind)
    if len(args) == 2 and args[1] is Ellipsis:
        return (args[0],) * count
    if count != len(args):
        raise ConfigError(f"{name} must have {len(args)} entries, got {count}")
    return args


def _coerce(value: Any, kind: Any, name: str) -> Any:
    """Check a JSON value against ``kind``; lists become tuples and ints are accepted as floats."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _bad(name, kind, value)
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, name)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _bad(name, kind, value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _bad(name, kind, value)
        item_types = _item_types(kind, len(value), name)
        return tuple(_coerce(v, k, name) for v, k in zip(value, item_types, strict=True))
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind in (bool, int, str) and type(value) is kind:
        return value
    raise _bad(name, kind, value)
