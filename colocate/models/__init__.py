"""Models built locally (no hub access) for tests and CPU runs."""
