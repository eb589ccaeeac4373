"""Sizing a command before it runs, and refusing it at once with the options that fit.

A command states what a choice of its options needs — the arrays it writes (:class:`~gatelens.cli.npz.Member`) and
the memory it holds, by part (:class:`Need`) — as a function of that choice. :func:`check_fits` compares the need
with the :class:`Limits` (--max-memory, the free disk where --out lies) and, if it does not fit, raises one
ValueError that states both sizes and the options that do fit: the command's own variants (--no-paths, --layer N,
--skip …), then the most steps and the most sequences that fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gatelens.cli.npz import Member, disk_bound

DEFAULT_MEMORY = 4 << 30  # --max-memory: what a laptop or a CI runner spares for one command
CHUNK_BYTES = 128 << 20  # working memory of one chunk of steps: larger chunks write no faster
ALLOCATOR_SLACK = 2  # resident memory per byte a chunk forms: freed blocks stay mapped for the next (measured ≤ 1.8)
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class Choice(Protocol):
    """A choice of a command's options, as a dataclass: steps start..stop−1 of the arrays, the input's sequences, and
    ``flags(base)``, the options that turn ``base`` into it."""

    start: int
    stop: int
    sequences: tuple[int, ...]

    @property
    def steps(self) -> int: ...

    def flags(self, base: Choice) -> list[str]: ...


def byte_size(text: str) -> int:
    """``4G``, ``512M``, ``1.5GiB``, ``1000000`` ↦ bytes (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", text, flags=re.IGNORECASE)
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 4G, 512M or 1.5GiB, got {text!r}")
    return int(float(match[1]) * UNITS[match[2].lower()])


def gib(size: float) -> str:
    """A byte count for people: 1.2 GiB, 340 MiB, 12 KiB."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} bytes"


def baseline() -> int:
    """The process's peak resident memory so far (Python, torch, the model, the input): what the budget starts from."""
    try:
        import resource
    except ImportError:  # Windows: no getrusage; the budget then covers the command's own arrays only
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True)
class Need:
    """The arrays a selection writes and the memory it needs: ``memory`` by part (bytes), of which ``per_step``
    grows with each step of a chunk."""

    members: list[Member]
    memory: dict[str, int]
    per_step: int

    @property
    def peak(self) -> int:
        """Memory at the smallest chunk, one step."""
        return sum(self.memory.values()) + self.per_step

    @property
    def disk(self) -> int:
        return disk_bound(self.members)


@dataclass(frozen=True)
class Limits:
    """What the command may use: memory (--max-memory), the disk where --out lies."""

    memory: int
    disk: int
    folder: Path

    def problems(self, need: Need) -> list[str]:
        found = []
        if need.peak > self.memory:
            parts = [f"{name} {gib(size)}" for name, size in need.memory.items() if size]
            parts += [f"one step of a chunk {gib(need.per_step)}"] if need.per_step else []
            found.append(
                f"it needs {gib(need.peak)} of memory ({', '.join(parts)}), more than --max-memory {gib(self.memory)}"
            )
        if need.disk > self.disk:
            found.append(
                f"its {len(need.members)} arrays take {gib(need.disk)} (uncompressed: what compression saves cannot "
                f"be known before writing), and the disk holding {self.folder} has {gib(self.disk)} free"
            )
        return found

    def fits(self, need: Need) -> bool:
        return not self.problems(need)


def check_fits(
    command: str, estimate: Callable[[Choice], Need], chosen: Choice, limits: Limits, variants: Sequence[Choice]
) -> Need:
    """The need of ``chosen`` if it fits the limits; else one ValueError with the sizes and the options that fit:
    each variant (a single change: --no-paths, --layer N, --skip …) that fits, then the most steps and the most
    sequences that fit, alone and (if nothing simpler fits) with each variant."""
    need = estimate(chosen)
    problems = limits.problems(need)
    if not problems:
        return need
    found: list[list[str]] = []

    def offer(variant: Choice | None) -> None:
        """Keep a fitting variant unless one whose options it contains is kept already (after --skip by_lag, not
        --skip by_lag norms)."""
        if variant is None or not limits.fits(estimate(variant)):
            return
        flags = variant.flags(chosen)
        if not any(_atoms(kept) <= _atoms(flags) for kept in found):
            found.append(flags)

    for variant in variants:
        offer(variant)
    for base in [chosen] + ([] if found else list(variants)):
        offer(_fewer_steps(estimate, base, limits))
        offer(_fewer_sequences(estimate, base, limits))
    advice = (
        "These fit: " + "; ".join(" ".join(flags) for flags in found[:6])
        if found
        else "Nothing smaller fits: even one step of one sequence is too much"
    )
    if need.peak > limits.memory:
        advice += f"; or raise --max-memory to {gib(math.ceil(need.peak / (1 << 28)) * (1 << 28))}"
    if need.disk > limits.disk:
        advice += "; or write --out to a disk with more free space"
    raise ValueError(f"gatelens {command} refused before tracing: {'; '.join(problems)}. {advice}")


def _atoms(flags: list[str]) -> set[str]:
    """Options with one value each: ``--skip by_lag norms`` is ``--skip by_lag`` and ``--skip norms``."""
    atoms = set()
    for flag in flags:
        option, _, values = flag.partition(" ")
        atoms |= {f"{option} {value}" for value in values.split(" ")} if values else {option}
    return atoms


def _fewer_steps(estimate: Callable[[Choice], Need], base: Choice, limits: Limits) -> Choice | None:
    """``base`` with the most steps from its start (fewer than it has) that fit; None if not even one does."""
    count = _most(lambda n: limits.fits(estimate(dataclasses.replace(base, stop=base.start + n))), base.steps - 1)
    return None if count == 0 else dataclasses.replace(base, stop=base.start + count)


def _fewer_sequences(estimate: Callable[[Choice], Need], base: Choice, limits: Limits) -> Choice | None:
    """``base`` with the most of its first sequences (fewer than it has) that fit; None if not even one does."""

    def fits(count: int) -> bool:
        return limits.fits(estimate(dataclasses.replace(base, sequences=base.sequences[:count])))

    count = _most(fits, len(base.sequences) - 1)
    return None if count == 0 else dataclasses.replace(base, sequences=base.sequences[:count])


def _most(fits: Callable[[int], bool], most: int) -> int:
    """The largest n in 1..most with fits(n) (fits shrinks as n grows), or 0."""
    low, high = 0, most
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def chunk_steps(need: Need, limits: Limits) -> int:
    """Steps per chunk: CHUNK_BYTES of working memory, less where the budget leaves less, at least one."""
    room = limits.memory - sum(need.memory.values())
    return max(1, min(CHUNK_BYTES // max(need.per_step, 1), room // max(need.per_step, 1)))
