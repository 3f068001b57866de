"""PostgreSQL tables of the transaction capability, as append-only migration steps.

``{ns}`` becomes the namespace.  Never edit a released step: add one.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "PARTITIONS"]

# Outbox rows are spread over a fixed number of partitions by their key, so that
# one relay at a time owns a partition and the rows of one key leave in order.
PARTITIONS = 16

_V1 = """
CREATE TABLE {ns}_outbox (
    seq           bigserial PRIMARY KEY,
    msg_id        uuid NOT NULL UNIQUE,
    topic         text NOT NULL,
    key           text,
    partition     int NOT NULL,
    payload       text NOT NULL,
    headers       text,
    -- 0: ready for the relay; 1: half message of a transactional message, invisible
    state         smallint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,
    stream_id     text,
    checker       text,
    check_fence   bigint NOT NULL DEFAULT 0,
    checks        int NOT NULL DEFAULT 0,
    max_checks    int,
    check_every   double precision,
    next_check_at timestamptz
);
CREATE INDEX {ns}_outbox_pending ON {ns}_outbox (partition, seq)
    WHERE state = 0 AND published_at IS NULL;
CREATE INDEX {ns}_outbox_published ON {ns}_outbox (published_at)
    WHERE published_at IS NOT NULL;
CREATE INDEX {ns}_outbox_half ON {ns}_outbox (next_check_at) WHERE state = 1;

CREATE TABLE {ns}_outbox_lease (
    partition   int PRIMARY KEY,
    owner       text,
    fence       bigint NOT NULL DEFAULT 0,
    lease_until timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO {ns}_outbox_lease (partition) SELECT generate_series(0, 15);

CREATE TABLE {ns}_inbox (
    grp          text NOT NULL,
    msg_id       uuid NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (grp, msg_id)
);
CREATE INDEX {ns}_inbox_processed ON {ns}_inbox (processed_at);

-- One NOTIFY per transaction that makes rows ready (PostgreSQL folds equal
-- notifications of one transaction), so relays wake at commit, not by polling.
CREATE FUNCTION {ns}_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{ns}_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER {ns}_outbox_notify AFTER INSERT OR UPDATE OF state ON {ns}_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION {ns}_outbox_notify();
"""

# Every consumer group ever created, so that a group found missing (deleted by hand, or
# lost with a Redis that restarted empty) is told from a new one: a new group reads the
# whole stream; a recreated one only what its inbox still remembers (see Consumer).
_V2 = """
CREATE TABLE {ns}_consumer_group (
    topic      text NOT NULL,
    grp        text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, grp)
);
"""

MIGRATIONS: list[str] = [_V1, _V2]
