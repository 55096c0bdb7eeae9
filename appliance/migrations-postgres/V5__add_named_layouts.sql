-- Named storage layouts (issue 22): layouts kept by name, and each machine's default, which
-- a deploy to disk that gives no layout uses. The pair of this file is SQLite's V13.
CREATE TABLE layouts (
    name       TEXT COLLATE "C" PRIMARY KEY,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
ALTER TABLE machines ADD COLUMN default_layout TEXT;
