"""The example scripts run as a user runs them; api_tour.py exits with an error when its float64 self-check fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_api_tour_runs_and_its_self_checks_pass(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "api_tour.py")], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "forward matches torch" in result.stdout and "Traceback" not in result.stderr
