"""Entry points: the OpenAI-compatible server plugin and the `vllm-oprm` launcher."""
