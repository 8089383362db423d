"""Options owned by methods and transforms: each declares a small frozen dataclass next to its algorithm.

A method or transform module writes its settings as a frozen dataclass whose
fields are declared with :func:`option` (flat key, help, check) and registers it
once with :func:`register_options`.  :data:`ptqlab.config.OPTIONS` turns every
field into a flat key (a ``ptqlab run`` flag, a recipe key, a record field),
so adding an option is one field in the module that reads it; nothing else is
edited by hand.  :class:`OptionSets` carries one instance of every registered
set inside a :class:`~ptqlab.config.QuantConfig` (``config.options.gptq.percdamp``).

This module imports nothing from ptqlab, so methods and transforms can use it without an import cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OptionMeta:
    """What a flat key says about one field of an option set."""

    key: str  # the flat key: recipe key, record field, ``--key`` on the command line
    help: str
    check: Callable[[object], object] | None  # None: derived from the default's type
    choices: tuple[str, ...] = ()  # for text options: the allowed values


def option(default: object, help: str, key: str | None = None, check: Callable[[object], object] | None = None,
           choices: tuple[str, ...] = ()) -> Any:
    """A field of an option set. ``key`` defaults to ``<prefix>_<field name>`` (the prefix given to
    :func:`register_options`); ``check`` validates a parsed value (ValueError with the reason)."""
    return dataclasses.field(default=default, metadata={"ptqlab": OptionMeta(key or "", help, check, choices)})


def int_at_least(lo: int) -> Callable[[object], int]:
    """A check: an integer (not a bool) of at least ``lo``."""

    def check(v: object) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"must be an integer >= {lo}")
        return v

    return check


def _as_number(v: object) -> object:
    if isinstance(v, str):
        try:
            return float(v)  # YAML 1.1 reads 1e-3 as text
        except ValueError:
            pass
    return v


def positive_float(v: object) -> float:
    """A check: a number > 0 (text such as ``1e-3`` read as a number)."""
    v = _as_number(v)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise ValueError("must be a positive number")
    return float(v)


def unit_float(v: object) -> float:
    """A check: a number in [0, 1]."""
    v = _as_number(v)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
        raise ValueError("must be a number in [0, 1]")
    return float(v)


@dataclass(frozen=True)
class OptionField:
    """One registered field: which set it belongs to, its name there, and its flat key."""

    owner: str
    name: str
    default: object
    meta: OptionMeta


@dataclass(frozen=True)
class OptionSet:
    owner: str  # the name under QuantConfig.options (``gptq``, ``zq``, ``smoothquant``)
    cls: type
    fields: tuple[OptionField, ...]


OPTION_SETS: dict[str, OptionSet] = {}
_LISTENERS: list[Callable[[OptionSet], None]] = []


def register_options(owner: str, cls: type, prefix: str | None = None) -> type:
    """Register ``cls`` (a frozen dataclass of :func:`option` fields) as the option set ``owner``.

    ``prefix``: the start of the flat keys of fields that do not name their own key (default ``owner``).
    Several methods may read one set (ZQ-Local and ZQ-Global read ``zq``); it is registered once.
    """
    if owner in OPTION_SETS:
        if OPTION_SETS[owner].cls is cls:
            return cls
        raise ValueError(f"option set '{owner}' is registered twice")
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"option set '{owner}': {cls.__name__} must be a frozen dataclass")
    fields = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("ptqlab")
        if meta is None:
            raise TypeError(f"option set '{owner}': field {f.name} is not declared with ptqlab.options.option()")
        if not meta.key:
            meta = dataclasses.replace(meta, key=f"{prefix if prefix is not None else owner}_{f.name}")
        fields.append(OptionField(owner, f.name, f.default, meta))
    entry = OptionSet(owner, cls, tuple(fields))
    OPTION_SETS[owner] = entry
    for listener in _LISTENERS:
        listener(entry)
    return cls


def unregister_options(owner: str) -> None:
    """Remove a set (tests that register a toy transform clean up with it)."""
    entry = OPTION_SETS.pop(owner, None)
    if entry is not None:
        for listener in _LISTENERS:
            listener(dataclasses.replace(entry, fields=()))


def on_register(listener: Callable[[OptionSet], None]) -> None:
    """Call ``listener`` for every set registered from now on (and for the ones already registered)."""
    _LISTENERS.append(listener)
    for entry in list(OPTION_SETS.values()):
        listener(entry)


class OptionSets(Mapping):
    """One instance of every registered option set, by owner: ``sets.gptq``, ``sets["zq"]``. Immutable.

    Built from a mapping of the sets given; the others take their defaults, so a set registered later
    (a new transform) is present in every config made after it.
    """

    __slots__ = ("_sets",)

    def __init__(self, sets: Mapping[str, object] | None = None) -> None:
        given = dict(sets or {})
        unknown = [k for k in given if k not in OPTION_SETS]
        if unknown:
            raise ValueError(f"unknown option set '{unknown[0]}'; registered: {', '.join(OPTION_SETS)}")
        values = {}
        for owner, entry in OPTION_SETS.items():
            value = given.get(owner)
            if value is None:
                value = entry.cls()
            elif isinstance(value, Mapping):
                value = entry.cls(**value)
            elif not isinstance(value, entry.cls):
                raise TypeError(f"option set '{owner}' must be a {entry.cls.__name__}, got {type(value).__name__}")
            values[owner] = value
        object.__setattr__(self, "_sets", values)

    def __getattr__(self, owner: str) -> object:
        if owner.startswith("_"):  # copy/pickle probe attributes before _sets exists
            raise AttributeError(owner)
        try:
            return object.__getattribute__(self, "_sets")[owner]
        except KeyError:
            raise AttributeError(f"no option set '{owner}'; registered: {', '.join(OPTION_SETS)}") from None

    def __setattr__(self, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field '{name}'")

    def __reduce__(self) -> tuple:  # pickling (Ray workers) and deepcopy rebuild through __init__
        return (OptionSets, (dict(self._sets),))

    def as_dicts(self) -> dict[str, dict]:
        return {k: dataclasses.asdict(v) for k, v in self._sets.items()}

    def __getitem__(self, owner: str) -> object:
        return self._sets[owner]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sets)

    def __len__(self) -> int:
        return len(self._sets)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OptionSets) and self._sets == other._sets

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._sets.items(), key=lambda kv: kv[0])))

    def __repr__(self) -> str:
        return f"OptionSets({', '.join(f'{k}={v!r}' for k, v in self._sets.items())})"

    def replace(self, owner: str, **changes: object) -> OptionSets:
        """A copy with fields of one set changed: ``sets.replace("gptq", act_order=True)``."""
        return OptionSets({**self._sets, owner: dataclasses.replace(self._sets[owner], **changes)})
