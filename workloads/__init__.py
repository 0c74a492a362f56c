"""Pure-PyTorch workloads of mpq-sweep: quantizers, models, data, cost model, training loops. No Ray, no MLflow."""
