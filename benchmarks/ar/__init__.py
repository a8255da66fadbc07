"""Associative recall: a tiny Mamba2 trained here, evaluated vanilla vs OPRM through vLLM."""
