"""Messages: what a handler or a check-back receives, and the checks at ``publish``."""

from __future__ import annotations

import json
import re
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from asgi_dist.errors import ConfigError, TransactionError
from asgi_dist.transactions.schema import PARTITIONS

__all__ = ["Message", "encode_headers", "encode_payload", "partition_of", "validate_topic"]

# Topic and group names become Redis keys and consumer group names: keep them tame.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
_MAX_HEADERS = 64


def validate_topic(topic: str, what: str = "topic") -> str:
    if not isinstance(topic, str) or not _NAME.fullmatch(topic):
        raise ConfigError(
            f"{what} {topic!r} is invalid: use 1-200 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit (e.g. 'orders.created')"
        )
    return topic


def encode_payload(payload: Any, max_bytes: int) -> str:
    """JSON text of ``payload``; refuses what JSON cannot carry faithfully, and big payloads."""
    try:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TransactionError(
            f"the message payload is not JSON ({exc}): publish dicts, lists, strings, numbers, "
            "booleans or None (convert dates, decimals and objects first)"
        ) from None
    size = len(_utf8(text, "the message payload"))
    if size > max_bytes:
        raise TransactionError(
            f"the message payload is {size} bytes; the limit is {max_bytes} "
            "(TransactionConfig(max_payload=...)): publish a reference to the data instead"
        )
    return text


def encode_headers(headers: Mapping[str, str] | None, max_bytes: int) -> str | None:
    """JSON text of ``headers``, within the same bound as a payload (``max_payload``)."""
    if headers is None:
        return None
    if (
        not isinstance(headers, Mapping)
        or len(headers) > _MAX_HEADERS
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    ):
        raise TransactionError(
            f"message headers must be a mapping of at most {_MAX_HEADERS} str -> str, "
            f"got {headers!r}"
        )
    text = json.dumps(dict(headers), separators=(",", ":"), ensure_ascii=False)
    size = len(_utf8(text, "the message headers"))
    if size > max_bytes:
        raise TransactionError(
            f"the message headers are {size} bytes; the limit is {max_bytes} "
            "(TransactionConfig(max_payload=...)): keep headers to short metadata"
        )
    return text


def validate_key(key: str | None) -> str | None:
    if key is not None and (not isinstance(key, str) or not key or len(key) > 512):
        raise TransactionError(f"message key {key!r} must be None or a string of 1-512 characters")
    if key is not None:
        # PostgreSQL text cannot hold NUL: refused here, before a round trip that
        # would abort the caller's transaction.
        if "\x00" in key:
            raise TransactionError(
                f"message key {key!r} contains a NUL character, which PostgreSQL text "
                "cannot store: remove it (or encode the key, e.g. in hex)"
            )
        _utf8(key, "the message key")
    return key


def _utf8(text: str, what: str) -> bytes:
    """``text`` as UTF-8; a lone surrogate (e.g. from a bad decode) cannot be stored."""
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise TransactionError(
            f"{what} contains {text[exc.start : exc.end]!r}, a lone surrogate that UTF-8 cannot "
            "encode (usually text decoded with errors='surrogateescape'): fix or re-decode it "
            "before publishing"
        ) from None


def partition_of(key: str | None, msg_id: uuid.UUID) -> int:
    """Rows of one key share a partition, hence a relay, hence their order."""
    basis = key.encode() if key is not None else msg_id.bytes
    return zlib.crc32(basis) % PARTITIONS


@dataclass(frozen=True)
class Message:
    """One message as a consumer handler or a ``check`` function sees it.

    ``attempt`` is the delivery number for consumers (1 on first delivery) and the
    check-back number for transactional messages.
    """

    id: str
    topic: str
    payload: Any
    key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    attempt: int = 1
    stream_id: str | None = None

    @classmethod
    def from_entry(
        cls, topic: str, stream_id: str, fields: Mapping[bytes, bytes], attempt: int
    ) -> Message:
        """Decode a stream entry written by the relay; ``ValueError`` if it is not one."""
        try:
            msg_id = str(uuid.UUID(fields[b"id"].decode()))
            payload = json.loads(fields[b"payload"])
            key = fields[b"key"].decode() if b"key" in fields else None
            headers = json.loads(fields[b"headers"]) if b"headers" in fields else {}
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"stream entry {stream_id} is not an asgi_dist message: {exc}"
            ) from exc
        if not isinstance(headers, dict):
            raise ValueError(f"stream entry {stream_id} has headers that are not an object")
        return cls(msg_id, topic, payload, key, headers, attempt, stream_id)
