"""A flash-sale shop on asgi_dist: sessions, locks, transactions, outbox, consumers, jobs."""
