"""Isolated, version-gated fixes to vLLM, applied by vllm_oprm.plugin (installed as vllm_oprm.patches)."""
