"""Conversations that continue across requests: affinity, parking, resume, limits, retention."""
