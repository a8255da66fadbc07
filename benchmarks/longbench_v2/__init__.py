"""LongBench v2 through ``OPRMLLM``, from a local ``data.json`` (nothing is downloaded).

``run`` writes resumable zero-shot predictions; ``score`` gives accuracy as LongBench v2's ``result.py``.
"""
