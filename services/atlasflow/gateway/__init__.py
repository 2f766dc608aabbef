"""The web gateway: the review app's JSON API, DICOMweb and login, calling the four gRPC services
as the logged-in user (docs/gateway.md)."""
