"""OPRM inside vLLM's engine: entropy capture, chunk fan-out, offline API."""
