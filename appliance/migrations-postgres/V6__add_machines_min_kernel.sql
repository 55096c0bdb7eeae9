-- Each machine's minimum kernel (issue 22): a deploy boots one of the image's kernels at
-- least this release. The pair of this file is SQLite's V14.
ALTER TABLE machines ADD COLUMN min_kernel TEXT;
