-- MCP clients identified by the URL of their client ID metadata document: one row per URL, its
-- name and redirect URIs refreshed from the document whenever control fetches it again; codes
-- and refresh tokens name the row's id as for registered clients.
ALTER TABLE oauth_clients ADD COLUMN metadata_url TEXT;
CREATE UNIQUE INDEX oauth_clients_metadata_url ON oauth_clients (metadata_url);
