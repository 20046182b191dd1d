"""Storage: URIs (fsspec, S3), Parquet schemas, the run layout, shard commits, manifests and snapshots.
The only package that spells a path inside a run (storage.layout.RunLayout); imports nothing else of the project."""
