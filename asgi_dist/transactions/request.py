"""The request-scoped PostgreSQL transaction (``get_tx()``)."""

from __future__ import annotations

__all__ = ["RequestTransaction"]


class RequestTransaction:
    """Placeholder until the transaction capability lands."""
