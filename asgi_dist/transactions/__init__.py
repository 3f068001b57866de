"""Distributed transactions: request transaction, outbox, consumers, transactional messages."""

from asgi_dist.transactions.service import TransactionConfig, TransactionService

__all__ = ["TransactionConfig", "TransactionService"]
