"""A sweep's specification, read from TOML (or a dict), checked once, and expanded into its grid points.

    experiment = "long-range"     # an experiment with a per-point function (Experiment.point)
    preset = "quick"              # the configuration every point starts from (default "quick")
    name = "adding-lengths"       # optional: names the default output folder (default: the file's stem)

    [settings]                    # optional: one value for every point, overriding the preset's
    epochs = 10

    [grid]                        # every combination of these values is one point
    architecture = ["gru", "elman", "lstm", "gru-chrono"]
    length = [10, 20, 40]
    seed = [0, 1, 2]

Keys of [settings] and [grid] are the experiment's *axes* (what picks one run: a task, a length, an architecture, a
seed) and its *settings* (the preset's keys a run reads: hidden, epochs, lr, …). A point's configuration is the
preset's settings, then [settings], then the axes' defaults, then the point's grid values; every value is checked
against the axis's choices or the preset value's type before any work starts.

A point is identified by its hash: 16 hex digits of SHA-256 over the experiment's name and its configuration as
canonical JSON (sorted keys). The sweep is identified by the hash of its sorted point hashes, so that the same points
are the same sweep however the grid is written, and a folder holding another sweep's results can be refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when used: `import gatelens` stays free of the experiments and matplotlib
    from gatelens.experiments.runner import Axis, Experiment, Point

KEYS = ("experiment", "preset", "name", "settings", "grid")
RESERVED = ("point", "status", "error", "seconds", "worker", "started", "finished", "config")  # the table's columns

MAX_POINTS = 100_000  # a grid larger than this is refused: its rows would not fit one table well


@dataclass(frozen=True)
class GridPoint:
    """One point of a sweep: its hash, its grid values (in the grid's key order) and its whole configuration."""

    key: str
    values: dict[str, Any]
    config: dict[str, Any]


@dataclass(frozen=True)
class SweepSpec:
    """A checked sweep specification (see the module docstring) and its points, in grid order (the last grid key
    varies fastest)."""

    name: str
    experiment: Experiment
    preset: str
    settings: dict[str, Any]
    grid: dict[str, list[Any]]
    points: tuple[GridPoint, ...]
    key: str

    @property
    def point(self) -> Point:
        """The experiment's per-point function and its declarations."""
        assert self.experiment.point is not None  # read_spec refuses experiments without one
        return self.experiment.point

    def to_dict(self) -> dict[str, Any]:
        """The specification as JSON values, as a TOML spec would give it."""
        return {
            "experiment": self.experiment.name,
            "preset": self.preset,
            "name": self.name,
            "settings": dict(self.settings),
            "grid": {key: list(values) for key, values in self.grid.items()},
        }


def sweepable() -> list[str]:
    """The names of the experiments a sweep can run (those with a per-point function)."""
    from gatelens.experiments.catalog import EXPERIMENTS

    return [name for name, experiment in EXPERIMENTS.items() if experiment.point is not None]


def read_spec(source: str | os.PathLike[str] | Mapping[str, Any] | SweepSpec) -> SweepSpec:
    """A :class:`SweepSpec` from a TOML file's path, a dict of the same shape, or a SweepSpec (returned as is).

    A dict may name its experiment by an :class:`Experiment` object instead of a name, to sweep an experiment of
    one's own; its ``point.run`` must then be importable by the Dask workers (or defined in ``__main__``).
    Raises one ValueError or TypeError, starting with where the spec came from, for anything that does not fit.
    """
    if isinstance(source, SweepSpec):
        return source
    raw, origin, stem = _load(source)
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValueError(f"{origin}: unknown key{'s' if len(unknown) > 1 else ''} {_names(unknown)}; "
                         f"expected {_names(KEYS)}")  # fmt: skip
    experiment = _experiment(raw.get("experiment"), origin)
    point = experiment.point
    assert point is not None
    preset = raw.get("preset", "quick")
    if not isinstance(preset, str) or preset not in experiment.presets:
        raise ValueError(f"{origin}: unknown preset {preset!r} for {experiment.name}; expected one of "
                         f"{_names(experiment.presets)}")  # fmt: skip
    name = raw.get("name", stem or experiment.name)
    if not isinstance(name, str) or not name or set(name) & set("/\\") or name in (".", ".."):
        raise ValueError(f"{origin}: name must be a non-empty string usable as a folder name, got {name!r}")
    defaults = experiment.presets[preset]
    settings = _table(raw.get("settings", {}), "[settings]", origin)
    grid = _table(raw.get("grid"), "[grid]", origin)
    valid = list(point.axes) + list(point.settings)
    for where, table in (("[settings]", settings), ("[grid]", grid)):
        bad = [key for key in table if key not in valid]
        if bad:
            raise ValueError(
                f"{origin}: unknown {where} key{'s' if len(bad) > 1 else ''} {_names(bad)} for {experiment.name}; "
                f"valid keys: {_names(point.axes)} (what picks a run) and {_names(point.settings)} (the preset's "
                "settings)"
            )
    if not grid:
        raise ValueError(f"{origin}: the grid is empty; give [grid] at least one key with a list of values, e.g. "
                         f"seed = [0, 1, 2]; valid keys: {_names(valid)}")  # fmt: skip
    both = [key for key in grid if key in settings]
    if both:
        raise ValueError(f"{origin}: {_names(both)} in both [settings] and [grid]; give each key in one of them")
    taken = [key for key in valid if key in RESERVED or key in point.metrics]
    if taken:
        raise ValueError(f"{experiment.name} names a key {_names(taken)} that is also a results column; rename it")
    missing = [key for key, axis in point.axes.items() if axis.default is None and key not in settings | grid]
    if missing:
        raise ValueError(
            f"{origin}: {experiment.name} needs a value for {_names(missing)}: give "
            + "; ".join(f"{key} ({point.axes[key].help})" for key in missing)
            + " in [grid] or [settings]"
        )
    settings = {key: _value(key, value, point, defaults, f"{origin}: [settings]") for key, value in settings.items()}
    grid = {key: _axis_values(key, values, point, defaults, origin) for key, values in grid.items()}
    base = {key: defaults[key] for key in point.settings} | {
        key: axis.default for key, axis in point.axes.items() if axis.default is not None
    }
    base |= settings
    count = math.prod(len(values) for values in grid.values())
    if count > MAX_POINTS:
        sizes = " × ".join(f"{len(values)} {key}" for key, values in grid.items())
        raise ValueError(
            f"{origin}: the grid has {count:,} points ({sizes}), more than {MAX_POINTS:,}; split it into several "
            f"sweeps (each its own folder)"
        )
    points = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination))
        config = base | values
        points.append(GridPoint(point_key(experiment.name, config), values, config))
    key = _hash(sorted(point.key for point in points))
    return SweepSpec(name, experiment, preset, settings, grid, tuple(points), key)


def point_key(experiment: str, config: Mapping[str, Any]) -> str:
    """A point's hash: 16 hex digits of SHA-256 over the experiment's name and the configuration (canonical JSON)."""
    return _hash({"experiment": experiment, "config": dict(config)})


def canonical(value: Any) -> str:
    """``value`` as canonical JSON: sorted keys, no spaces; NaN and infinity refused."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _hash(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode("utf-8")).hexdigest()[:16]


def _load(source: Any) -> tuple[dict[str, Any], str, str | None]:
    """The raw spec, a name for it in messages, and the file's stem (None for a dict)."""
    if isinstance(source, Mapping):
        return dict(source), "sweep spec", None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"spec must be a path to a TOML file, a dict or a SweepSpec, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no such sweep spec file: {path}")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, packaged as tomli (in the sweep extra)
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "reading a TOML spec on Python 3.10 needs tomli: pip install 'gatelens[sweep]'"
            ) from None
    try:
        with path.open("rb") as file:
            raw = tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the sweep spec {path}: {error}") from None
    return raw, str(path), path.stem


def _experiment(value: Any, origin: str) -> Experiment:
    from gatelens.experiments.catalog import EXPERIMENTS
    from gatelens.experiments.runner import Experiment

    if isinstance(value, Experiment):
        experiment = value
    elif isinstance(value, str):
        if value not in EXPERIMENTS:
            raise ValueError(f"{origin}: unknown experiment {value!r}; expected one of {_names(sweepable())}")
        experiment = EXPERIMENTS[value]
    elif value is None:
        raise ValueError(f"{origin}: no experiment given; add experiment = one of {_names(sweepable())}")
    else:
        raise TypeError(f"{origin}: experiment must be a name (str), got {type(value).__name__}")
    if experiment.point is None:
        raise ValueError(f"{origin}: the experiment {experiment.name!r} has no per-point function, so it cannot be "
                         f"swept; experiments that can: {_names(sweepable())}")  # fmt: skip
    return experiment


def _table(value: Any, where: str, origin: str) -> dict[str, Any]:
    if value is None:
        raise ValueError(f"{origin}: no {where} table; give it with one list of values per key, e.g. seed = [0, 1]")
    if not isinstance(value, Mapping):
        raise TypeError(f"{origin}: {where} must be a table (key = value lines), got {type(value).__name__}")
    return dict(value)


def _axis_values(key: str, values: Any, point: Point, defaults: Mapping[str, Any], origin: str) -> list[Any]:
    """One grid key's values, each checked; a key must list at least one value and none twice."""
    if not isinstance(values, list) or not values:
        raise ValueError(f"{origin}: [grid] {key} must be a non-empty list of values, e.g. {key} = [a, b], "
                         f"got {values!r}")  # fmt: skip
    checked = [_value(key, value, point, defaults, f"{origin}: [grid]") for value in values]
    seen: set[str] = set()
    for value in checked:
        text = canonical(value)
        if text in seen:
            raise ValueError(f"{origin}: [grid] {key} lists {value!r} more than once")
        seen.add(text)
    return checked


def _value(key: str, value: Any, point: Point, defaults: Mapping[str, Any], where: str) -> Any:
    """``value`` checked against the axis ``key`` or against the type of the preset's value of the setting ``key``
    (an int is taken where the preset has a float, as a float)."""
    if key in point.axes:
        return _axis_value(key, value, point.axes[key], where)
    return _like(defaults[key], value, f"{where} {key}")


def _axis_value(key: str, value: Any, axis: Axis, where: str) -> Any:
    if axis.choices is not None:
        if not isinstance(value, str) or value not in axis.choices:
            raise ValueError(f"{where} {key}: {value!r} is not one of {_names(axis.choices)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < axis.minimum:
        raise ValueError(f"{where} {key}: expected an int ≥ {axis.minimum} ({axis.help}), got {value!r}")
    return value


def _like(reference: Any, value: Any, where: str) -> Any:
    """``value`` if it has the kind of ``reference`` (bool, int, real, str, list of those, table), else an error."""
    kind = None
    if isinstance(reference, bool):
        if isinstance(value, bool):
            return value
        kind = "true or false"
    elif isinstance(reference, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        kind = "an int"
    elif isinstance(reference, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        kind = "a finite number"
    elif isinstance(reference, str):
        if isinstance(value, str):
            return value
        kind = "a string"
    elif isinstance(reference, (list, tuple)):
        if isinstance(value, list) and reference:
            return [_like(reference[0], item, f"{where}[{index}]") for index, item in enumerate(value)]
        if isinstance(value, list):
            return value
        kind = "a list"
    elif isinstance(reference, Mapping):
        if isinstance(value, Mapping):
            return {name: _like(reference.get(name), item, f"{where}.{name}") for name, item in value.items()}
        kind = "a table"
    else:  # the preset has no value (None): anything JSON can hold
        try:
            canonical(value)
        except (TypeError, ValueError):
            kind = "a JSON value"
        else:
            return value
    raise ValueError(f"{where}: expected {kind} like the preset's {reference!r}, got {value!r}")


def _names(values: Any) -> str:
    return ", ".join(str(value) for value in values)
