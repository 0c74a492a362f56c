"""Control plane of mpq-sweep: config, CLI, Ray Train/Tune/Core wrapping, searches, MLflow, Parquet."""
