"""Sweeps: an experiment's per-point function over a grid (architectures × lengths × seeds × …) on a Dask cluster,
local or remote, each point's row written as soon as it finishes, resumable, with an aggregate table and figures.

    import gatelens as gl
    result = gl.sweep("adding.toml", out="results/adding")          # a local cluster, one worker per CPU
    result = gl.sweep(spec, client)                                  # an existing dask.distributed.Client
    result.rows, result.failed, result.summary, result.text

The spec format is in :mod:`gatelens.sweep.spec`, the folder's files in :mod:`gatelens.sweep.table`, the order of
work and what happens on failures in :mod:`gatelens.sweep.driver`. Dask is imported only when a sweep runs.
"""

from gatelens.sweep.driver import SweepResult, sweep
from gatelens.sweep.spec import GridPoint, SweepSpec, read_spec, sweepable

__all__ = ["GridPoint", "SweepResult", "SweepSpec", "read_spec", "sweep", "sweepable"]
