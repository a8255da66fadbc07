"""vLLM model classes the plugin registers for families vLLM lacks (one file per family)."""
