"""LongBench and LongBench-E through ``OPRMLLM``, from local jsonl files (nothing is downloaded).

``run`` writes resumable predictions per dataset; ``score`` scores them with LongBench's metrics.
"""
