"""Output folders, checked before any work starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def writable_folder(out: str | os.PathLike[str]) -> Path:
    """``out`` as a folder that exists and accepts files (created if needed), or one clear ValueError."""
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a folder path (str or os.PathLike), got {type(out).__name__}")
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{str(folder)!r} is not a writable directory: {error.strerror or error}") from None
    return folder
