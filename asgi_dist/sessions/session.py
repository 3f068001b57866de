"""The session object a request sees."""

from __future__ import annotations

from typing import Any

__all__ = ["Session"]


class Session(dict[str, Any]):
    """Placeholder until the session capability lands."""
