"""Prefect tasks: thin wrappers over ``coalora.stages`` (cache key, retries, logging). No ML logic."""
