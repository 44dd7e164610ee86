"""Shared by tests/unit (no Ray, seconds) and tests/ray (a real local Ray, clusters, job submit)."""
