-- name: TokenLookup
SELECT t.id, t.organisation_id, o.name
FROM api_tokens t JOIN organisations o ON o.id = t.organisation_id
WHERE t.token_hash = $1 AND t.deleted_at IS NULL AND o.deleted_at IS NULL
  AND (t.expires_at IS NULL OR t.expires_at > now());

-- name: TokenTouch
UPDATE api_tokens SET last_used_at = now() WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute');

-- name: OrgUpsert
INSERT INTO organisations (id, name) VALUES ($1, $2)
ON CONFLICT (name) WHERE deleted_at IS NULL DO UPDATE SET name = excluded.name
RETURNING id;

-- name: OrgInsert
INSERT INTO organisations (id, name) VALUES ($1, $2);

-- name: UserUpsert
INSERT INTO users (id, email) VALUES ($1, $2)
ON CONFLICT (lower(email)) WHERE deleted_at IS NULL DO UPDATE SET email = users.email
RETURNING id;

-- name: MembershipUpsert
INSERT INTO memberships (organisation_id, user_id, role) VALUES ($1, $2, $3)
ON CONFLICT (organisation_id, user_id) DO UPDATE SET deleted_at = NULL;

-- name: MembersList
SELECT u.id, u.email, m.role, m.created_at FROM memberships m JOIN users u ON u.id = m.user_id
WHERE m.organisation_id = $1 AND m.deleted_at IS NULL AND u.deleted_at IS NULL ORDER BY m.created_at;

-- name: TokenEnsure
-- Returns the organisation the token belongs to (an existing one wins).
INSERT INTO api_tokens (id, organisation_id, user_id, name, token_hash) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (token_hash) WHERE deleted_at IS NULL DO UPDATE SET token_hash = excluded.token_hash
RETURNING organisation_id;

-- name: TokenInsert
INSERT INTO api_tokens (id, organisation_id, name, token_hash) VALUES ($1, $2, $3, $4);

-- name: TokensList
SELECT id, name, created_at, last_used_at FROM api_tokens
WHERE organisation_id = $1 AND deleted_at IS NULL ORDER BY created_at;

-- name: TokenDelete
UPDATE api_tokens SET deleted_at = now() WHERE id = $1 AND organisation_id = $2 AND deleted_at IS NULL;

-- name: ProjectInsert
INSERT INTO projects (id, organisation_id, name, github_repo, github_branch, image_template, port, health_path,
                      min_instances_per_region, vcpus, memory_mib, git_url, dockerfile, build_context)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14);

-- name: ProjectsList
SELECT id, name, github_repo, github_branch, image_template, port, health_path, min_instances_per_region,
       vcpus, memory_mib, active_deployment_id, created_at, git_url, dockerfile, build_context, git_token_nonce IS NOT NULL
FROM projects WHERE organisation_id = $1 AND deleted_at IS NULL ORDER BY name;

-- name: ProjectGet
SELECT id, name, github_repo, github_branch, image_template, port, health_path, min_instances_per_region,
       vcpus, memory_mib, active_deployment_id, created_at, git_url, dockerfile, build_context, git_token_nonce IS NOT NULL
FROM projects WHERE organisation_id = $1 AND deleted_at IS NULL AND (id::text = $2 OR name = $2);

-- name: ProjectUpdate
UPDATE projects SET github_repo = $3, github_branch = $4, image_template = $5, port = $6, health_path = $7,
       min_instances_per_region = $8, vcpus = $9, memory_mib = $10, git_url = $11, dockerfile = $12, build_context = $13,
       updated_at = now()
WHERE id = $1 AND organisation_id = $2 AND deleted_at IS NULL;

-- name: ProjectSetGitToken
-- A NULL nonce and ciphertext clear the token.
UPDATE projects SET git_token_nonce = $2, git_token_ciphertext = $3, updated_at = now()
WHERE id = $1 AND deleted_at IS NULL;

-- name: ProjectDelete
UPDATE projects SET deleted_at = now() WHERE id = $1 AND organisation_id = $2 AND deleted_at IS NULL;

-- name: ProjectDeleteDomains
UPDATE domains SET deleted_at = now() WHERE project_id = $1 AND deleted_at IS NULL;

-- name: ProjectStopInstances
UPDATE instances i SET desired_state = 'stopped', updated_at = now()
FROM deployments d
WHERE d.id = i.deployment_id AND d.project_id = $1 AND i.deleted_at IS NULL AND i.desired_state = 'running';

-- name: ProjectStopDeployments
UPDATE deployments SET status = 'stopped', finished_at = now(), updated_at = now()
WHERE project_id = $1 AND status NOT IN ('failed', 'stopped');

-- name: EnvUpsert
INSERT INTO project_env_vars (project_id, name, nonce, ciphertext) VALUES ($1, $2, $3, $4)
ON CONFLICT (project_id, name) DO UPDATE SET nonce = $3, ciphertext = $4, updated_at = now();

-- name: EnvList
SELECT name, updated_at FROM project_env_vars WHERE project_id = $1 ORDER BY name;

-- name: EnvAll
SELECT name, nonce, ciphertext FROM project_env_vars WHERE project_id = $1;

-- name: EnvDelete
DELETE FROM project_env_vars WHERE project_id = $1 AND name = $2;

-- name: DeploymentInsert
INSERT INTO deployments (id, project_id, organisation_id, hostname, image_ref, commit_sha, branch, preview,
                         idempotency_key, deadline_at, commit_message)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now() + $10::interval, left($11::text, 1000))
ON CONFLICT DO NOTHING;

-- name: DeploymentByIdempotency
SELECT id FROM deployments WHERE project_id = $1 AND idempotency_key = $2 AND deleted_at IS NULL;

-- name: DeploymentBySHA
-- The deployment that holds the commit's place (deployments_project_sha_key).
SELECT id FROM deployments WHERE project_id = $1 AND commit_sha = $2 AND deleted_at IS NULL
  AND status NOT IN ('failed', 'stopped') AND (status <> 'superseded' OR healthy_at IS NOT NULL);

-- name: DeploymentGet
SELECT d.id, d.project_id, p.name, d.status, d.hostname, d.image_ref, coalesce(i.digest, ''), d.commit_sha, d.branch,
       d.preview, d.failure_reason, d.created_at, d.preparing_at, d.starting_at, d.healthy_at, d.active_at, d.finished_at,
       p.active_deployment_id IS NOT DISTINCT FROM d.id, d.building_at, b.id, b.state, b.error, d.commit_message
FROM deployments d JOIN projects p ON p.id = d.project_id
LEFT JOIN images i ON i.id = d.image_id
LEFT JOIN builds b ON b.deployment_id = d.id
WHERE d.organisation_id = $1 AND d.id::text = $2 AND d.deleted_at IS NULL AND p.deleted_at IS NULL;

-- name: DeploymentsList
SELECT d.id FROM deployments d
WHERE d.project_id = $1 AND d.deleted_at IS NULL ORDER BY d.created_at DESC LIMIT $2;

-- name: DeploymentSetStatus
UPDATE deployments SET status = $2, updated_at = now(),
       building_at  = CASE WHEN $2 = 'building'  THEN now() ELSE building_at END,
       preparing_at = CASE WHEN $2 = 'preparing' THEN now() ELSE preparing_at END,
       starting_at  = CASE WHEN $2 = 'starting'  THEN now() ELSE starting_at END,
       healthy_at   = CASE WHEN $2 = 'healthy'   THEN coalesce(healthy_at, now()) ELSE healthy_at END,
       active_at    = CASE WHEN $2 = 'active'    THEN now() ELSE active_at END,
       finished_at  = CASE WHEN $2 IN ('failed', 'stopped', 'superseded') THEN now() ELSE finished_at END,
       failure_reason = CASE WHEN $3 <> '' THEN $3 ELSE failure_reason END
WHERE id = $1;

-- name: InstancesOfDeployment
SELECT i.id, i.node_id, r.name, i.state, i.healthy, i.desired_state, i.error, i.restarts, n.address, n.state
FROM instances i JOIN regions r ON r.id = i.region_id JOIN nodes n ON n.id = i.node_id
WHERE i.deployment_id = $1 AND i.deleted_at IS NULL ORDER BY r.name, i.created_at;

-- name: InstancesList
SELECT i.id, i.deployment_id, i.node_id, r.name, i.state, i.healthy, i.desired_state, i.error, i.restarts
FROM instances i JOIN regions r ON r.id = i.region_id JOIN deployments d ON d.id = i.deployment_id
JOIN projects p ON p.id = d.project_id
WHERE d.organisation_id = $1 AND i.deleted_at IS NULL AND d.deleted_at IS NULL AND p.deleted_at IS NULL
  AND ($2 = '' OR i.deployment_id::text = $2)
ORDER BY i.created_at;

-- name: DomainInsert
INSERT INTO domains (id, project_id, organisation_id, name, verification_token) VALUES ($1, $2, $3, $4, $5);

-- name: DomainsList
SELECT id, name, verification_token, verified_at, last_checked_at, last_error, created_at
FROM domains WHERE project_id = $1 AND deleted_at IS NULL ORDER BY name;

-- name: DomainGet
SELECT d.id, d.project_id, d.name, d.verification_token, d.verified_at, d.last_checked_at, d.last_error, d.created_at
FROM domains d JOIN projects p ON p.id = d.project_id
WHERE d.organisation_id = $1 AND d.deleted_at IS NULL AND p.deleted_at IS NULL AND (d.id::text = $2 OR d.name = $2);

-- name: DomainCertificates
-- A domain's certificates in certmagic's storage, under any issuer:
-- certificates/<issuer key>/<domain>/<domain>.crt ($1 is the key component).
SELECT value FROM acme_storage
WHERE key LIKE 'certificates/%' AND split_part(key, '/', 3) = $1
  AND key = 'certificates/' || split_part(key, '/', 2) || '/' || $1 || '/' || $1 || '.crt'
LIMIT 10;

-- name: DomainSetVerified
UPDATE domains SET verified_at = CASE WHEN $2 THEN coalesce(verified_at, now()) ELSE NULL END,
       last_checked_at = now(), last_error = $3
WHERE id = $1;

-- name: DomainDelete
UPDATE domains SET deleted_at = now() WHERE id = $1 AND organisation_id = $2 AND deleted_at IS NULL;

-- name: DomainsToRecheck
SELECT id, name, verification_token, last_checked_at FROM domains
WHERE deleted_at IS NULL AND (last_checked_at IS NULL OR last_checked_at < now() - $1::interval)
ORDER BY last_checked_at NULLS FIRST LIMIT 50;

-- name: NodesList
SELECT n.id, r.name, n.hostname, n.address, n.state, n.vcpus, n.memory_mib, n.last_heartbeat_at,
       (SELECT count(*) FROM instances i WHERE i.node_id = n.id AND i.deleted_at IS NULL AND i.desired_state = 'running'),
       n.max_builds, (SELECT count(*) FROM builds b WHERE b.node_id = n.id AND b.state = 'running')
FROM nodes n JOIN regions r ON r.id = n.region_id WHERE n.deleted_at IS NULL ORDER BY r.name, n.hostname, n.id;

-- name: NodeSetState
UPDATE nodes SET state = $2, updated_at = now() WHERE id::text = $1 AND deleted_at IS NULL;

-- name: RegionsList
SELECT r.name, count(n.id) FILTER (WHERE n.state = 'ready'), count(n.id)
FROM regions r LEFT JOIN nodes n ON n.region_id = r.id AND n.deleted_at IS NULL
WHERE r.deleted_at IS NULL GROUP BY r.name ORDER BY r.name;

-- name: IdempotencyGet
SELECT request_hash, status_code, response FROM idempotency_keys WHERE organisation_id = $1 AND key = $2;

-- name: IdempotencyPut
INSERT INTO idempotency_keys (organisation_id, key, request_hash, status_code, response) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING;

-- name: DomainLock
SELECT verified_at, last_checked_at FROM domains WHERE id = $1 FOR UPDATE;

-- name: MembershipDelete
UPDATE memberships SET deleted_at = now()
WHERE organisation_id = $1 AND user_id = $2 AND deleted_at IS NULL;

-- name: OwnersCount
SELECT count(*) FROM memberships WHERE organisation_id = $1 AND role = 'owner' AND deleted_at IS NULL;

-- name: NodeForRemoval
-- The node (locked), its live and stopping instances and its running builds.
SELECT n.id, n.state,
       (SELECT count(*) FROM instances i WHERE i.node_id = n.id AND i.deleted_at IS NULL AND i.desired_state = 'running'),
       (SELECT count(*) FROM instances i WHERE i.node_id = n.id AND i.deleted_at IS NULL AND i.desired_state <> 'running'),
       (SELECT count(*) FROM builds b WHERE b.node_id = n.id AND b.state = 'running')
FROM nodes n WHERE n.id::text = $1 AND n.deleted_at IS NULL FOR UPDATE OF n;

-- name: NodeRemove
-- A removed node's leftover instance rows (stopped ones of a down node)
-- go with it.
WITH gone AS (UPDATE nodes SET deleted_at = now(), updated_at = now() WHERE id = $1 AND deleted_at IS NULL RETURNING id)
UPDATE instances SET deleted_at = now(), updated_at = now()
WHERE node_id IN (SELECT id FROM gone) AND deleted_at IS NULL;
