-- Web console sessions (internal/console). The session's token is checked
-- with TokenLookup on every request, like a bearer token.

-- name: ConsoleSessionInsert
INSERT INTO console_sessions (id_hash, token_id, csrf_token, expires_at) VALUES ($1, $2, $3, now() + $4::interval);

-- name: ConsoleSessionGet
SELECT t.token_hash, s.csrf_token
FROM console_sessions s JOIN api_tokens t ON t.id = s.token_id
WHERE s.id_hash = $1 AND s.expires_at > now();

-- name: ConsoleSessionDelete
DELETE FROM console_sessions WHERE id_hash = $1;

-- name: ConsoleSessionsExpire
DELETE FROM console_sessions WHERE expires_at <= now();
