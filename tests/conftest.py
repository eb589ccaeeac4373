"""Test-wide set-up: caches that libraries keep under HOME go to a temporary folder instead."""

from __future__ import annotations

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="gatelens-test-cache-")
os.environ["MPLCONFIGDIR"] = os.path.join(_CACHE, "matplotlib")  # matplotlib's font cache and config
os.environ["KERAS_HOME"] = os.path.join(_CACHE, "keras")

# Hypothesis profiles (tests/test_flow_properties.py takes its example counts from max_examples × 4 in all):
# "ci", the default, runs a fixed set of 2,000 examples in about a minute (derandomized, so a run fails only on a
# change of code, never on a new draw); "thorough" draws 20,000 new ones: pytest --hypothesis-profile=thorough
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=500,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("ci")
