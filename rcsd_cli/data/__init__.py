"""What flows between stages: row and config schemas, option declarations, input layouts, Parquet artifacts."""
