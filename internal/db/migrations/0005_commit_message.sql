-- The commit message of a deployment: head_commit.message of the GitHub
-- push that created it, or the API request's commit_message. Bounded to
-- 1000 characters on insert (DeploymentInsert truncates).
ALTER TABLE deployments ADD COLUMN commit_message text NOT NULL DEFAULT '';
