"""Everything that talks to S3-compatible storage: paths, the client and its answer table (`storage`),
the bulk transfer engine for the dataset (`pull`), compare-and-swap JSON objects (`pointers`) and the
transfer progress display (`progress`). Imports nothing of the job above it."""
