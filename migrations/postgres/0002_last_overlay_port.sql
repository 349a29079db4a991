-- The highest overlay port ever given to a resource of the site: new resources get the next free
-- port above it, so a freed port is not handed out again while a node may still hold it.
ALTER TABLE sites ADD COLUMN last_overlay_port BIGINT NOT NULL DEFAULT 0;
