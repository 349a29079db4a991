-- Per HTTP resource: answer plain-HTTP requests with a redirect to HTTPS, and send HSTS over HTTPS.
ALTER TABLE resources ADD COLUMN redirect_https BIGINT NOT NULL DEFAULT 0;
ALTER TABLE resources ADD COLUMN hsts_max_age BIGINT;
