"""Ranking service: attention-based case priority and the review worklist."""
