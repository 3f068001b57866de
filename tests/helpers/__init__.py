"""Test helpers: private servers and real OS processes."""
