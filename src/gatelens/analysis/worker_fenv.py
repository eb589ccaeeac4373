"""Give torch's intra-op (OpenMP) threads the floating-point environment of the calling thread.

``torch.set_flush_denormal`` sets the flush-to-zero and denormals-are-zero bits of the calling thread alone. The
threads of torch's OpenMP pool keep theirs (a thread inherits its creator's environment when it is created, and the
pool is created at torch's first parallel kernel), so with ``torch.get_num_threads() > 1`` every parallel kernel
computes part of its work with subnormal numbers, up to 100 times slower: a float32 credit map at T = 256, H = 64
took 0.75 s on two threads against 0.57 s on one, and 0.47 s on two with every thread flushing.

:func:`follow_caller` runs one parallel region through the OpenMP runtime's ``GOMP_parallel`` entry point (libgomp,
and the Intel and LLVM runtimes, which provide it too) in which every thread of the team calls the C library's
``fesetenv`` with the caller's environment. Where the runtime or the C maths library cannot be reached (another parallel
backend, a platform without them), it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import torch

FENV_BYTES = 64  # at least sizeof(fenv_t): 32 bytes on x86-64 glibc, 8 on AArch64
RUNTIMES = ("libgomp", "libiomp", "libomp")  # the OpenMP runtimes that export GOMP_parallel
Region = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def follow_caller() -> None:
    """Set the calling thread's floating-point environment on every thread of torch's intra-op pool."""
    reached = _reach()
    if reached is None or torch.get_num_threads() < 2:
        return
    libm, parallel = reached
    environment = ctypes.create_string_buffer(FENV_BYTES)
    if libm.fegetenv(environment) != 0:
        return

    @Region
    def adopt(_: Any) -> None:  # runs on every thread of the team, the caller's included
        libm.fesetenv(environment)

    parallel(adopt, None, torch.get_num_threads(), 0)


@functools.cache
def _reach() -> tuple[Any, Any] | None:
    """The C maths library (fegetenv, fesetenv) and the GOMP_parallel of the OpenMP runtime torch runs on, or None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            loaded = {line.split()[-1] for line in maps if "/" in line}
        runtime = next(path for path in sorted(loaded) if path.rsplit("/", 1)[-1].startswith(RUNTIMES))
        libm = ctypes.CDLL(ctypes.util.find_library("m"))  # fegetenv and fesetenv (glibc keeps them in libm)
        libm.fegetenv.argtypes = libm.fesetenv.argtypes = [ctypes.c_char_p]
        parallel = ctypes.CDLL(runtime).GOMP_parallel
    except (OSError, StopIteration, AttributeError, TypeError):
        return None
    parallel.argtypes = [Region, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    return libm, parallel
