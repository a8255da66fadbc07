"""Measurements against vanilla: speed, memory and quality (run as `python -m benchmarks.<name>`)."""
