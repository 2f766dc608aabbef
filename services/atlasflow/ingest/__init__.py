"""Ingest service: DICOM C-STORE SCP and gRPC upload, durable spool, series assembly."""
