"""Old home of the diagnose/profile renderables, kept for ``qdiff._diagnose`` / ``qdiff._profile``."""

# removed at merge
from qdiff.render import diagnose_renderable, profile_renderable

__all__ = ["diagnose_renderable", "profile_renderable"]
