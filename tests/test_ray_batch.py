"""OPRM over a jsonl dataset with two engine replicas as a Ray Data pipeline (local Ray, CPU)."""

import glob
import json

import pytest
import torch

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

from vllm_oprm import OPRMConfig, OPRMPrompt  # noqa: E402
from vllm_oprm.reference import OPRMGenerator  # noqa: E402
from vllm_oprm.testing import build_model_dir, same_words, words  # noqa: E402


def test_two_replicas_over_a_dataset_equal_the_reference(tmp_path):
    from vllm_oprm.entrypoints.ray_batch import run

    model_dir = str(tmp_path / "model")
    model, tokenizer = build_model_dir("mamba2", model_dir, seed=4)
    rng = torch.Generator().manual_seed(4)
    rows = [{"id": i, "prefix": words(rng, 4), "context": words(rng, 60), "suffix": words(rng, 3)} for i in range(8)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        run(
            str(tmp_path / "rows.jsonl"), str(tmp_path / "out"), model_dir, replicas=2,
            oprm={"chunk_size": 16, "max_batch_tokens": 60},
            sampling={"max_tokens": 6, "temperature": 0.0, "ignore_eos": True},
            engine_args={"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "max_num_seqs": 8},
            batch_size=2,
        )
    finally:
        ray.shutdown()

    out = [json.loads(line) for path in glob.glob(str(tmp_path / "out" / "*.json*")) for line in open(path)]
    assert sorted(row["id"] for row in out) == list(range(8))
    reference = OPRMGenerator(model, tokenizer)
    config = OPRMConfig(chunk_size=16, max_batch_tokens=60)
    for row in out:
        ref = reference.generate(OPRMPrompt(row["prefix"], row["context"], row["suffix"]), config,
                                 max_new_tokens=6, eos_token_id=-1)
        assert same_words(row["text"], ref.text)
        assert (row["num_chunks"], row["selected_chunk"]) == (ref.num_chunks, ref.selected_chunk)
        assert json.loads(row["entropies"]) == pytest.approx(ref.entropies, abs=1e-4)
