"""Test-wide set-up: caches that libraries keep under HOME go to a temporary folder instead."""

from __future__ import annotations

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="gatelens-test-cache-")
os.environ["MPLCONFIGDIR"] = os.path.join(_CACHE, "matplotlib")  # matplotlib's font cache and config
os.environ["KERAS_HOME"] = os.path.join(_CACHE, "keras")
