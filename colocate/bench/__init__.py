"""Benchmarks: colocated refit against vLLM's own weight-transfer path."""
