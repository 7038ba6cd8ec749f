"""Warm `claude` processes: one `Worker` per process, one `Pool` per profile."""
