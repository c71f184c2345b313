"""Build hook for qdiff's optional C extension (everything else is in pyproject.toml).

``qdiff._ckernels`` computes the per-sample metrics in one pass over each tensor pair. It is
optional: where it cannot be compiled (no C compiler), the install still succeeds and qdiff
uses its numpy implementation of the same metrics (``meta["metrics_kernel"]`` says which ran).
"""

import sys

from setuptools import Extension, setup

args = [] if sys.platform == "win32" else ["-O3", "-fno-fast-math", "-std=c99"]
setup(
    ext_modules=[
        Extension("qdiff._ckernels", sources=["qdiff/_ckernels.c"], extra_compile_args=args, optional=True),
    ]
)
