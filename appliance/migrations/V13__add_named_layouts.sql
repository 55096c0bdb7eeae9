-- Named storage layouts (issue 22): layouts kept by name, and each machine's default, which
-- a deploy to disk that gives no layout uses. The pair of this file is PostgreSQL's V5.
CREATE TABLE layouts (
    name       TEXT PRIMARY KEY,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
ALTER TABLE machines ADD COLUMN default_layout TEXT;
