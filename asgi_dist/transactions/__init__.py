"""Distributed transactions: request transaction, outbox, consumers, transactional messages."""

from asgi_dist.transactions.checkback import CheckResult, TransactionalMessage
from asgi_dist.transactions.config import TransactionConfig
from asgi_dist.transactions.message import Message
from asgi_dist.transactions.request import RequestTransaction, transactional
from asgi_dist.transactions.service import TransactionService
from asgi_dist.transactions.transaction import Transaction

__all__ = [
    "CheckResult",
    "Message",
    "RequestTransaction",
    "Transaction",
    "TransactionConfig",
    "TransactionService",
    "TransactionalMessage",
    "transactional",
]
