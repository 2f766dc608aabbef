"""Typed settings of the web gateway (``ATLASFLOW_GATEWAY_<FIELD>``).

The gateway is a backend-for-frontend: it owns no data and calls the four gRPC services as the
logged-in user (their bearer token), so the services' policy decides what a user may do. It
checks tokens with the same settings as the services (``AUTH_JWKS``, ``AUTH_ISSUER``, ...,
inherited from `ServiceSettings`) and reads blobs (volumes, label maps, heatmaps) from the
shared blob store (``BLOB_DIR``) only after a gRPC call, as the user, named them.
"""

from __future__ import annotations

from dataclasses import dataclass

from atlasflow.common.settings import ServiceSettings

PREFIX = "ATLASFLOW_GATEWAY_"


@dataclass(frozen=True)
class GatewaySettings(ServiceSettings):
    # HTTP listener; https when the inherited tls_cert_file and tls_key_file are set (then the
    # session cookie is Secure). The same certificate is the client certificate of the gateway's
    # gRPC calls (mTLS) when tls_ca_file is set (ServiceSettings.client_tls).
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # The gRPC services (host:port)
    ingest_target: str = "127.0.0.1:50051"
    segmentation_target: str = "127.0.0.1:50052"
    ranking_target: str = "127.0.0.1:50053"
    labels_target: str = "127.0.0.1:50054"
    # Local login (the embedded stack): the LocalIssuer's directory (its signing key mints the
    # session tokens) and the users file (scrypt hashes, atlasflow.common.users). Both empty: no
    # password login.
    local_issuer_dir: str = ""
    users_file: str = ""
    # Lifetime of a session token minted at login, seconds
    session_ttl_s: float = 3600.0
    # OIDC authorization code + PKCE (a cluster): the provider's issuer URL (its discovery
    # document is <issuer>/.well-known/openid-configuration), this client's id, the redirect
    # URI registered at the provider (<public base>/login/oidc/callback), and optionally a file
    # holding the client secret (confidential clients).
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_redirect_uri: str = ""
    oidc_client_secret_file: str = ""
    oidc_scopes: str = "openid profile"
    # The review app's folder (index.html, app.css, build/app.js); empty: the package's gateway/web
    web_dir: str = ""
    # Largest request body accepted (a revision), bytes
    max_request_bytes: int = 1024 * 1024 * 1024
    # Largest instance of a STOW-RS request, bytes (the body is parsed as a stream, so a STOW
    # may hold any number of instances; a larger one fails with 0xA700 and the others go on);
    # ingest's own MAX_INSTANCE_MB applies too
    max_instance_bytes: int = 2 * 1024 * 1024 * 1024
    # The gateway's audit log (gateway/audit.py: logins, downloads, refusals): a PostgreSQL URL
    # (several replicas share one log; from a Secret, like the labels service's DATABASE_URL);
    # empty: <DATA_DIR>/audit.sqlite3 (keep DATA_DIR on a volume)
    database_url: str = ""
