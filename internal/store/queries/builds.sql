-- Builds from source: the API's records and the leader's build scheduler
-- (internal/operator/builds).

-- name: BuildInsert
INSERT INTO builds (id, deployment_id, project_id, organisation_id, branch, source_kind, git_url, commit_sha,
                    source_id, source_sha256, image)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11);

-- name: BuildBySource
SELECT deployment_id FROM builds WHERE project_id = $1 AND source_id = $2;

-- name: SourceInsert
INSERT INTO build_sources (id, organisation_id, project_id, data, size, sha256) VALUES ($1, $2, $3, $4, $5, $6);

-- name: SourcesOfProjectCount
SELECT count(*) FROM build_sources WHERE project_id = $1;

-- name: SourceOfProject
SELECT sha256 FROM build_sources WHERE id::text = $1 AND project_id = $2;

-- name: SourceInfo
SELECT size, sha256 FROM build_sources WHERE id::text = $1;

-- name: SourceChunk
SELECT substring(data FROM $2 FOR $3) FROM build_sources WHERE id = $1;

-- name: SourceDelete
DELETE FROM build_sources WHERE id = $1;

-- name: SourcesExpired
-- Uploads no open build uses, past their grace period.
DELETE FROM build_sources s
WHERE s.created_at < now() - $1::interval
  AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.source_id = s.id AND b.state IN ('queued', 'running'));

-- name: BuildGet
SELECT b.id, b.deployment_id, b.project_id, p.name, b.branch, b.state, b.node_id, b.source_kind, b.commit_sha,
       b.source_sha256, b.image, b.image_digest_ref, b.error, b.cache_hits, b.steps, b.log_truncated,
       b.created_at, b.started_at, b.finished_at, b.deadline_at
FROM builds b JOIN projects p ON p.id = b.project_id
WHERE b.organisation_id = $1 AND b.id::text = $2 AND p.deleted_at IS NULL;

-- name: BuildsOfProject
SELECT b.id, b.deployment_id, b.project_id, p.name, b.branch, b.state, b.node_id, b.source_kind, b.commit_sha,
       b.source_sha256, b.image, b.image_digest_ref, b.error, b.cache_hits, b.steps, b.log_truncated,
       b.created_at, b.started_at, b.finished_at, b.deadline_at
FROM builds b JOIN projects p ON p.id = b.project_id
WHERE b.project_id = $1 ORDER BY b.created_at DESC, b.id DESC LIMIT $2;

-- name: BuildWhere
-- Where a build's live log is: its state and its node.
SELECT b.state, coalesce(n.address, ''), coalesce(n.state, 'down')
FROM builds b LEFT JOIN nodes n ON n.id = b.node_id AND n.deleted_at IS NULL
WHERE b.id = $1;

-- name: BuildLogLines
SELECT seq, time, stream, line FROM build_logs WHERE build_id = $1 AND seq > $2 ORDER BY seq;

-- name: BuildCancelOfDeployment
UPDATE builds b SET state = 'canceled', error = $2, finished_at = now()
WHERE b.deployment_id = $1 AND b.state IN ('queued', 'running')
RETURNING b.id, b.source_id, coalesce((SELECT n.address FROM nodes n WHERE n.id = b.node_id AND n.state <> 'down'), '');

-- name: NodeBuildsReport
UPDATE nodes SET builds = $2 WHERE id = $1 AND builds IS DISTINCT FROM $2::jsonb RETURNING id;

-- name: DeploymentStartBuilding
UPDATE deployments SET status = 'building', building_at = now(), updated_at = now()
WHERE id = $1 AND status = 'pending';

-- name: BuildsOfClosedDeployments
-- Open builds whose deployment no longer waits for them (stopped, its
-- project deleted, …) are canceled.
UPDATE builds b SET state = 'canceled', finished_at = now(),
       error = CASE WHEN b.error <> '' THEN b.error ELSE 'its deployment is ' || d.status END
FROM deployments d
WHERE d.id = b.deployment_id AND b.state IN ('queued', 'running')
  AND (d.status NOT IN ('pending', 'building') OR d.deleted_at IS NOT NULL)
RETURNING b.id, b.source_id, coalesce((SELECT n.address FROM nodes n WHERE n.id = b.node_id AND n.state <> 'down'), '');

-- name: BuildsSupersedeQueued
-- A newer queued build of a project and branch replaces the older queued
-- ones; returns the replaced builds and what replaced them.
WITH newest AS (
    SELECT DISTINCT ON (project_id, branch) id, project_id, branch, commit_sha, source_sha256, deployment_id
    FROM builds WHERE state = 'queued'
    ORDER BY project_id, branch, created_at DESC, id DESC
)
UPDATE builds b SET state = 'canceled', finished_at = now(),
       error = 'superseded by a newer build (' || CASE WHEN n.commit_sha <> '' THEN 'commit ' || n.commit_sha
                                                       ELSE 'source ' || left(n.source_sha256, 12) END || ')'
FROM newest n
WHERE b.state = 'queued' AND b.project_id = n.project_id AND b.branch = n.branch AND b.id <> n.id
RETURNING b.id, b.deployment_id, b.source_id, b.branch, n.commit_sha, n.source_sha256, n.deployment_id;

-- name: DeploymentSupersededByBuild
UPDATE deployments SET status = 'superseded', finished_at = now(), failure_reason = $2, updated_at = now()
WHERE id = $1 AND status IN ('pending', 'building');

-- name: BuildNodes
SELECT n.id, n.hostname, n.address, n.state, n.max_builds, n.builds FROM nodes n WHERE n.deleted_at IS NULL;

-- name: BuildsRunning
SELECT b.id, b.deployment_id, b.node_id, b.accepted, b.started_at, b.deadline_at + $1::interval < now()
FROM builds b WHERE b.state = 'running' ORDER BY b.started_at, b.id;

-- name: BuildAccepted
UPDATE builds SET accepted = true WHERE id = $1 AND NOT accepted;

-- name: BuildsQueued
SELECT b.id, b.organisation_id, b.project_id FROM builds b WHERE b.state = 'queued' ORDER BY b.created_at, b.id;

-- name: BuildsRunningByOrg
-- Per organisation: its running builds and when it last got a slot.
SELECT o.id,
       (SELECT count(*) FROM builds b WHERE b.organisation_id = o.id AND b.state = 'running'),
       (SELECT max(b.started_at) FROM builds b WHERE b.organisation_id = o.id)
FROM (SELECT DISTINCT id FROM unnest($1::uuid[]) AS u(id)) o;

-- name: BuildsLastNode
-- The node of each project's newest successful build (its layer cache).
SELECT DISTINCT ON (project_id) project_id, node_id FROM builds
WHERE state = 'succeeded' AND node_id IS NOT NULL AND project_id = ANY($1::uuid[])
ORDER BY project_id, finished_at DESC;

-- name: BuildSpec
SELECT b.deployment_id, b.project_id, b.source_kind, b.git_url, b.commit_sha, b.source_id, b.source_sha256,
       p.dockerfile, p.build_context, p.git_token_nonce, p.git_token_ciphertext, p.name, o.name
FROM builds b JOIN projects p ON p.id = b.project_id JOIN organisations o ON o.id = b.organisation_id
WHERE b.id = $1;

-- name: BuildStart
UPDATE builds SET state = 'running', node_id = $2, image = $3, started_at = now(), deadline_at = now() + $4::interval
WHERE id = $1 AND state = 'queued';

-- name: BuildSucceed
UPDATE builds SET state = 'succeeded', image_digest_ref = $2, cache_hits = $3, steps = $4, finished_at = now()
WHERE id = $1 AND state = 'running'
RETURNING deployment_id, source_id, started_at;

-- name: BuildEnd
UPDATE builds SET state = $2, error = $3, cache_hits = $4, steps = $5, finished_at = now()
WHERE id = $1 AND state IN ('queued', 'running')
RETURNING deployment_id, source_id, started_at;

-- name: DeploymentBuilt
-- The build pushed the image: the deployment goes on with it under a fresh
-- deadline.
UPDATE deployments SET image_ref = $2, status = 'preparing', preparing_at = now(),
       deadline_at = now() + $3::interval, updated_at = now()
WHERE id = $1 AND status IN ('pending', 'building');

-- name: DeploymentBuildFailed
UPDATE deployments SET status = 'failed', failure_reason = $2, finished_at = now(), updated_at = now()
WHERE id = $1 AND status IN ('pending', 'building');

-- name: BuildLogsInsert
INSERT INTO build_logs (build_id, seq, time, stream, line)
SELECT $1, x.seq, x.time, x.stream, x.line
FROM unnest($2::integer[], $3::timestamptz[], $4::text[], $5::text[]) AS x(seq, time, stream, line)
ON CONFLICT DO NOTHING;

-- name: BuildLogSaved
UPDATE builds SET log_saved = true, log_truncated = $2 WHERE id = $1;

-- name: BuildsKnown
SELECT id, state, log_saved FROM builds WHERE id = ANY($1::uuid[]);

-- name: BuildsQueuedCount
SELECT count(*) FROM builds WHERE state = 'queued';
