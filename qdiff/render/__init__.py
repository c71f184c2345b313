"""Terminal rendering of results with rich.

Each result class names its renderer in ``Result._renderer``; ``Result.__rich__`` looks that name
up here, so results never import this package at module top. The submodules import rich only
inside the functions that draw, so importing :mod:`qdiff.render` (e.g. for :func:`clean`) does not
load rich.

- :mod:`qdiff.render.tables`: :class:`FitTable`, :class:`Col`, number formatting, :func:`clean` /
  :func:`cell` (names and messages escaped);
- :mod:`qdiff.render.compare`: compare and match (alignment);
- :mod:`qdiff.render.sensitivity`, :mod:`qdiff.render.fallback`;
- :mod:`qdiff.render.diagnose`: diagnose and profile.
"""

from __future__ import annotations

from qdiff.render.compare import alignment_renderable, compare_renderable, print_compare
from qdiff.render.diagnose import diagnose_renderable, findings_table, frame_table, profile_renderable
from qdiff.render.fallback import fallback_renderable
from qdiff.render.sensitivity import sensitivity_renderable
from qdiff.render.tables import Col, FitTable, cell, clean

__all__ = [
    "compare_renderable", "alignment_renderable", "sensitivity_renderable", "fallback_renderable",
    "diagnose_renderable", "profile_renderable", "print_compare", "findings_table", "frame_table",
    "clean", "cell", "FitTable", "Col",
]  # fmt: skip
