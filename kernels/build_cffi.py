"""cffi (API, out-of-line mode) build of the C kernels into ``bitnet_cli._kernels``.

setup.py names this file in ``cffi_modules``, so ``pip install .`` / ``pip install -e .`` compiles
it. The interface is kernels/bitnet.h itself, minus preprocessor lines and _Static_asserts, so the
header is the one place the C API (and the layout constants Python reads) is written down. Flags: -O3 and no -march: every SIMD variant is compiled with
target attributes and picked at run time (see dispatch.c), so the module runs on any CPU of its
architecture; -ffp-contract=off: no multiply-add is fused unless the code says so, so plain C float
code rounds alike in every copy and on every architecture (glue.c).
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["dispatch.c", "ternary.c", "glue.c", "head.c", "attention.c", "pool.c", "model.c", "peak.c"]


def _cdef() -> str:
    lines = (HERE / "bitnet.h").read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith(("#", "_Static_assert")))


def _rel(path: Path) -> str:
    # setuptools wants source paths relative to the project root (the build's working directory)
    try:
        return os.path.relpath(path)
    except ValueError:  # different drive (Windows)
        return str(path)


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "bitnet_cli._kernels",
    '#include "bitnet.h"',
    sources=[_rel(HERE / s) for s in SOURCES],
    include_dirs=[_rel(HERE)],
    extra_compile_args=["-O3", "-std=gnu11", "-pthread", "-fno-math-errno", "-ffp-contract=off"],
    extra_link_args=["-pthread"],
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
