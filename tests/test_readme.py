"""README.md's Python snippets run top to bottom, as a new user pastes them, in one namespace.

Every ```python block is executed in order in a fresh working directory, so a block can only use what the README
itself creates earlier (models, files, variables). A block right below an HTML comment `<!-- not run: … -->` is
skipped: those few show how to read the user's own files. Comments that state a value are written in the README as
assertions, so running the blocks checks them too. Shell blocks are not run here (tests/test_cli.py covers commands).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

README = Path(__file__).parent.parent / "README.md"
NOT_RUN = re.compile(r"^<!--\s*not run:.*-->\s*$")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line number in README.md of the block's first code line
    code: str
    run: bool


def python_blocks(text: str) -> list[Block]:
    """Every ```python block in order; run=False when the nearest non-blank line above its opening fence is
    `<!-- not run: … -->`."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        above = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"README.md:{i + 1}: a ```python block is never closed"
        blocks.append(Block(line=i + 2, code="\n".join(lines[i + 1 : end]) + "\n", run=not NOT_RUN.match(above)))
        i = end + 1
    return blocks


def test_readme_python_blocks_run_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    for name, folder in {
        "HOME": home,
        "XDG_CACHE_HOME": home / ".cache",
        "TORCH_HOME": home / ".cache" / "torch",
        "MPLCONFIGDIR": home / ".cache" / "matplotlib",
        "KERAS_HOME": home / ".keras",
    }.items():
        monkeypatch.setenv(name, str(folder))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    torch.manual_seed(0)  # reproducible failures; the snippets must hold for any draw, not only this one
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    skipped = [block.line for block in blocks if not block.run]
    assert len(blocks) >= 5 and len(skipped) <= 1, f"{len(blocks)} blocks; keep not-run blocks few: lines {skipped}"
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        if not block.run:
            continue
        # Pad with blank lines so that tracebacks and assertion messages point at README.md's own line numbers.
        code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
        try:
            exec(code, namespace)  # the README's own code, as a user runs it
        except Exception as error:  # name the block; the cause's traceback follows
            first = block.code.splitlines()[0].strip()
            raise AssertionError(
                f"README.md block at line {block.line} ({first!r}) raised {type(error).__name__}: {error}"
            ) from error
