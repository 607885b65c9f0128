"""Connecting to Ray (local or a cluster address) and to Redis (embedded or a URL)."""
