"""What leaves the pipeline: the report, publishable SAE folders, the frontier, and MLflow tracking."""
