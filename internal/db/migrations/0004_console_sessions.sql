-- Web console sessions (internal/console, ADR 0700). The cookie carries a
-- random secret; only its SHA-256 is stored. A session is only as good as
-- the API token it was opened with: every request checks that token again
-- the way the API does, so revoking the token ends its sessions, and
-- signing out deletes the row.
CREATE TABLE console_sessions (
    id_hash    bytea PRIMARY KEY,                         -- SHA-256 of the cookie's secret
    token_id   uuid NOT NULL REFERENCES api_tokens (id),
    csrf_token text NOT NULL,                             -- synchronizer token of the session's forms
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires_idx ON console_sessions (expires_at);
