-- Builds from source (docs/adr/0600): a deployment of a project without an
-- image template is built from its repository (or an uploaded archive) in
-- a builder microVM on a node agent, pushed to BUILD_REGISTRY, then
-- deployed like any image. A deployment waits in 'building' (between
-- 'pending' and 'preparing') while its build is queued or running.

ALTER TABLE deployments DROP CONSTRAINT deployments_status_check;
ALTER TABLE deployments ADD CONSTRAINT deployments_status_check CHECK (status IN
    ('pending', 'building', 'preparing', 'starting', 'healthy', 'active', 'failed', 'stopped', 'superseded'));
ALTER TABLE deployments ADD COLUMN building_at timestamptz;
DROP INDEX deployments_open_idx;
CREATE INDEX deployments_open_idx ON deployments (status)
    WHERE status IN ('pending', 'building', 'preparing', 'starting', 'healthy') AND deleted_at IS NULL;
-- One deployment per (project, commit) — but a commit whose deployment
-- failed, was stopped or was superseded before it ever ran (a newer push
-- replaced its queued build) can be deployed again: that is how a failed
-- build is retried.
DROP INDEX deployments_project_sha_key;
CREATE UNIQUE INDEX deployments_project_sha_key ON deployments (project_id, commit_sha)
    WHERE commit_sha <> '' AND deleted_at IS NULL AND status NOT IN ('failed', 'stopped')
      AND (status <> 'superseded' OR healthy_at IS NOT NULL);

-- Where a project's image comes from when it has no image_template: its
-- repository (git_url, else GIT_BASE_URL/github_repo.git), the Dockerfile
-- (relative to build_context) and the context directory. The git token
-- (HTTPS, for private repositories) is sealed like environment variables
-- (AES-256-GCM, additional data = project id || "git-token") and never
-- returned by the API.
ALTER TABLE projects
    ADD COLUMN dockerfile text NOT NULL DEFAULT 'Dockerfile' CHECK (dockerfile <> '' AND length(dockerfile) <= 1024),
    ADD COLUMN build_context text NOT NULL DEFAULT '.' CHECK (build_context <> '' AND length(build_context) <= 1024),
    ADD COLUMN git_url text NOT NULL DEFAULT '' CHECK (length(git_url) <= 2048),
    ADD COLUMN git_token_nonce bytea,
    ADD COLUMN git_token_ciphertext bytea,
    ADD CONSTRAINT projects_git_token_check CHECK ((git_token_nonce IS NULL) = (git_token_ciphertext IS NULL));

-- Build slots a node offers and the builds it last reported (its
-- heartbeat's "builds": a JSON array of build.Status).
ALTER TABLE nodes
    ADD COLUMN max_builds integer NOT NULL DEFAULT 0 CHECK (max_builds BETWEEN 0 AND 1024),
    ADD COLUMN builds jsonb NOT NULL DEFAULT '[]';

-- Uploaded source archives (gzipped tar), kept until their build ends
-- (or an hour when no deployment uses them).
CREATE TABLE build_sources (
    id              uuid PRIMARY KEY,
    organisation_id uuid NOT NULL REFERENCES organisations (id),
    project_id      uuid NOT NULL REFERENCES projects (id),
    data            bytea NOT NULL,
    size            bigint NOT NULL CHECK (size > 0),
    sha256          text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX build_sources_created_idx ON build_sources (created_at);

CREATE TABLE builds (
    id               uuid PRIMARY KEY,
    deployment_id    uuid NOT NULL REFERENCES deployments (id),
    project_id       uuid NOT NULL REFERENCES projects (id),
    organisation_id  uuid NOT NULL REFERENCES organisations (id),
    branch           text NOT NULL DEFAULT '',
    state            text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    node_id          uuid REFERENCES nodes (id),       -- set when the build is assigned
    accepted         boolean NOT NULL DEFAULT false,   -- the node acknowledged POST /builds
    source_kind      text NOT NULL CHECK (source_kind IN ('git', 'archive')),
    git_url          text NOT NULL DEFAULT '',
    commit_sha       text NOT NULL DEFAULT '',
    source_id        uuid,                             -- build_sources row (deleted when the build ends)
    source_sha256    text NOT NULL DEFAULT '',
    image            text NOT NULL DEFAULT '',         -- target: <registry>/<org>/<project>:<tag>
    image_digest_ref text NOT NULL DEFAULT '',         -- result: <repository>@sha256:…
    error            text NOT NULL DEFAULT '',
    cache_hits       integer NOT NULL DEFAULT 0,
    steps            integer NOT NULL DEFAULT 0,
    log_saved        boolean NOT NULL DEFAULT false,   -- the agent's log is in build_logs
    log_truncated    boolean NOT NULL DEFAULT false,   -- ... without its oldest lines
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    deadline_at      timestamptz,
    CHECK ((source_kind = 'git') = (commit_sha <> '')),
    CHECK ((source_kind = 'archive') = (source_id IS NOT NULL))
);
CREATE UNIQUE INDEX builds_deployment_key ON builds (deployment_id);
CREATE UNIQUE INDEX builds_source_key ON builds (source_id) WHERE source_id IS NOT NULL;
CREATE INDEX builds_open_idx ON builds (created_at) WHERE state IN ('queued', 'running');
CREATE INDEX builds_project_idx ON builds (project_id, created_at DESC);
CREATE INDEX builds_succeeded_idx ON builds (project_id, finished_at DESC) WHERE state = 'succeeded';
CREATE INDEX builds_org_started_idx ON builds (organisation_id, started_at);

-- A finished build's log, at most 10,000 lines / 2 MiB (the newest kept).
CREATE TABLE build_logs (
    build_id uuid NOT NULL REFERENCES builds (id),
    seq      integer NOT NULL,
    time     timestamptz NOT NULL,
    stream   text NOT NULL,
    line     text NOT NULL,
    PRIMARY KEY (build_id, seq)
);
