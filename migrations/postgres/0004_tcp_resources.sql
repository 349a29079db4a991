-- Raw TCP resources: no hostname, a public port on every gateway.
ALTER TABLE resources ALTER COLUMN hostname DROP NOT NULL;
ALTER TABLE resources ADD COLUMN protocol TEXT NOT NULL DEFAULT 'http';
ALTER TABLE resources ADD COLUMN public_port BIGINT;
ALTER TABLE resources ADD CONSTRAINT resources_public_port_key UNIQUE (public_port);
