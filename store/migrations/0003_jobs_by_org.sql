-- Jobs listed per organization, newest first.
ALTER TABLE jobs ADD COLUMN created_us bigint;
UPDATE jobs SET created_us =
    (extract(epoch FROM ((doc::jsonb) ->> 'created_at')::timestamptz) * 1000000)::bigint;
ALTER TABLE jobs ALTER COLUMN created_us SET NOT NULL;
CREATE INDEX jobs_by_org ON jobs (org, created_us, id);
