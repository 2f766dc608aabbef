"""Shared runtime: server builder, errors, tracing, metrics, settings, blob store, outbox."""
