"""LongBench harness: the scorer against hand-computed scores, the prompts, and the runner on a tiny model."""

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("rouge")
pytest.importorskip("fuzzywuzzy")

from benchmarks.longbench import prompts, run, score  # noqa: E402
from vllm_oprm.testing import BOS_ID, IDK_ID, UNK_ID, build_tokenizer  # noqa: E402

from harness_engine import llm, sent  # noqa: E402,F401 (fixtures)

DATA = Path(__file__).parent / "data" / "longbench"

# tests/data/longbench/pred, one dataset per metric, each item worked out by hand.
EXPECTED = {
    # code edit similarity, first line without ` # //, fuzz.ratio rounded to an integer, /100:
    # "return x + 1" == truth -> 1.0; "x = 1" vs "x = 10": 2*5/11 = 0.909 -> 0.91; "" -> 0;
    # "// call it" skipped, "foo()" vs "foo();": 2*5/11 -> 0.91. 100 * 2.82 / 4 = 70.5
    "lcc": 70.5,
    # share of the numbers in the prediction equal to the truth: "5" of [5] -> 1; [5, 6] -> 1/2;
    # [15] -> 0 (whole numbers only). 100 * 1.5 / 3 = 50
    "passage_count": 50.0,
    # same with the truth's paragraph number 3: [3] -> 1; [12, 3] -> 1/2; [] -> 0; [30] -> 0. 100 * 1.5 / 4
    "passage_retrieval_en": 37.5,
    # qa F1: "Error" -> "unanswerable" == truth -> 1; "The BERT model." -> [bert, model]: vs
    # [bert, and, elmo] P 1/2 R 1/3 F 0.4, vs "BERT-base model" -> [bertbase, model] P 1/2 R 1/2 F 0.5,
    # max 0.5; "unanswerable" vs "yes" -> 0. 100 * 1.5 / 3 = 50
    "qasper": 50.0,
    # ROUGE-L F (rouge package: unique words, 2PR / (P + R + 1e-8)), first line only:
    # "Amanda baked cookies" vs "Amanda baked cookies for Jerry": LCS 3, P 3/3, R 3/5,
    # F = 1.2 / 1.60000001 = 0.7499999953; "" -> rouge raises -> 0. 100 * 0.7499999953 / 2 = 37.499999766 -> 37.5
    "samsum": 37.5,
    # classes [Animal, Individual, Description, person, Description of a person]; 1/k if the truth is among
    # the k classes found: "Animal\nIndividual" -> first line "Animal" -> 1; "Individual or Animal" -> 1/2;
    # "Description of a person" finds Description, person, Description of a person; "Description" is part
    # of the truth and dropped, and LongBench's loop then skips "person", so k = 2 -> 1/2.
    # 100 * 2 / 3 = 66.666 -> 66.67
    "trec": 66.67,
    # qa F1 on the first line: "Paris" -> 1; [eiffel, tower, is, in, paris] vs [eiffel, tower]:
    # P 2/5 R 1 F 0.8 / 1.4 = 0.5714. 100 * 1.5714 / 2 = 78.571 -> 78.57
    "triviaqa": 78.57,
}
# tests/data/longbench/pred_e, by length bucket (< 4000, < 8000, else).
EXPECTED_E = {
    # 0-4k: "Paris" (3000) -> 1, "London" (3999) -> 0: 50. 4-8k: "in Paris France" vs "Paris, France"
    # (4000): P 2/3 R 1 F 0.8: 80. 8k+: "Paris" (12000) -> 1, "Error" (8000, no mapping outside qasper) -> 0: 50
    "hotpotqa": {"0-4k": 50.0, "4-8k": 80.0, "8k+": 50.0},
    # "3" -> 1, "The answer is 3." -> 1, both under 4000 words; the other buckets are empty
    "passage_count": {"0-4k": 100.0, "4-8k": None, "8k+": None},
}


def scored(tmp_path, sample, *flags):
    run_dir = tmp_path / sample
    shutil.copytree(DATA / sample, run_dir)  # score writes result.json next to the predictions
    scores = score.main([str(run_dir), *flags])
    assert json.loads((run_dir / "result.json").read_text()) == scores
    return scores


def test_longbench_scores_equal_hand_computed(tmp_path):
    scores = scored(tmp_path, "pred")
    assert scores == EXPECTED
    # 50 + 66.67 + 78.57 + 37.5 + 50 + 70.5 + 37.5 = 390.74; / 7 = 55.82
    assert score.average(scores, e=False) == 55.82


def test_longbench_e_scores_by_length_bucket(tmp_path):
    scores = scored(tmp_path, "pred_e", "--e")
    assert scores == EXPECTED_E
    assert score.average(scores, e=True) == {"0-4k": 75.0, "4-8k": 80.0, "8k+": 50.0}


def test_templates_are_longbench_unless_edited():
    for dataset, text in prompts.TEMPLATES.items():
        assert text.count("{context}") == 1
        for family in prompts.FAMILIES.values():  # every edit applies (one that does not raises)
            assert ('"Error"' in prompts.template(dataset, family, idk=True)) == (dataset in prompts.IDK_EDITS)
        assert prompts.template(dataset, prompts.FAMILIES["plain"], idk=False) == text
    hotpot = prompts.template("hotpotqa", prompts.FAMILIES["plain"], idk=True)
    assert hotpot.endswith('other words. If the answer does not exist in the passages, return "Error".'
                           "\n\nQuestion: {input}\nAnswer:")
    qasper = prompts.template("qasper", prompts.FAMILIES["plain"], idk=True)
    assert "unanswerable" not in qasper and qasper.count('"Error"') == 4
    code = prompts.template("lcc", prompts.FAMILIES["falcon3-mamba"], idk=False)
    assert code.endswith("{context}Now complete the next line of code. Only give me the answer and do not "
                         "output any other words:\n")
    summary = prompts.template("qmsum", prompts.FAMILIES["recurrentgemma"], idk=False)
    assert "sentences. Only give me the answer and do not output any other words.\n\nQuery: {input}" in summary
    assert [prompts.mode(d) for d in ("gov_report", "lcc", "repobench-p")] == ["summarize", "last", "select"]


def test_prompt_ids_put_one_header_and_one_bos(tmp_path):
    tokenizer = build_tokenizer(str(tmp_path))
    item = {"input": "w7 w8", "context": "w1 w2 w3"}
    plain = prompts.build_prompt("trec", item, prompts.FAMILIES["plain"], tokenizer, idk=False)
    pre = len(prompts.TEMPLATES["trec"].split("{context}")[0].split())  # words, each <unk> here
    assert plain.prefix == [BOS_ID] + [UNK_ID] * pre
    assert plain.suffix == [5 + 7, 5 + 8]  # "\n{input}": w7 w8, after the 5 specials
    assert plain.tokenize(tokenizer).vanilla_ids == plain.prefix + [6, 7, 8] + plain.suffix
    falcon = prompts.FAMILIES["falcon-mamba"]
    header = prompts.build_prompt("trec", item, falcon, tokenizer, idk=False)
    assert header.prefix == [*falcon.start, *[UNK_ID] * pre]  # the header's BOS only
    assert header.suffix == [*plain.suffix, *falcon.end]
    rwkv = prompts.FAMILIES["rwkv6"]
    assert prompts.build_prompt("trec", item, rwkv, tokenizer, idk=False).prefix[-4:] == list(rwkv.pre_end)
    assert prompts.idk_token_ids(prompts.FAMILIES["plain"], tokenizer) == (IDK_ID,)
    assert prompts.idk_token_ids(prompts.FAMILIES["falcon3-mamba"], tokenizer) == ()


def test_middle_truncation_keeps_both_ends():
    assert run.middle_truncate(list(range(10)), 7) == [0, 1, 2, 7, 8, 9]
    assert run.middle_truncate(list(range(5)), 7) == list(range(5))


def test_missing_data_stops_before_the_engine(tmp_path):
    with pytest.raises(SystemExit, match="narrativeqa.jsonl"):
        run.main(["--data-dir", str(DATA / "data"), "--model", "m", "--family", "plain",
                  "--out-dir", str(tmp_path), "--datasets", "hotpotqa,narrativeqa"])


def args(tmp_path, *extra):
    return ["--data-dir", str(DATA / "data"), "--model", "tiny", "--family", "plain", "--out-dir", str(tmp_path),
            "--chunk-size", "100", "--batch-size", "2", *extra]


def lines(run_dir, dataset):
    return (run_dir / f"{dataset}.jsonl").read_text().splitlines()


def test_runner_completes_and_resumes(llm, sent, tmp_path):
    datasets = ["--datasets", "hotpotqa,lcc,qmsum"]
    run_dir = run.main(args(tmp_path, *datasets, "--limit", "1"), llm=llm)
    assert run_dir == tmp_path / "tiny-plain-oprm100" and len(sent) == 3
    first = {d: lines(run_dir, d) for d in ("hotpotqa", "lcc", "qmsum")}
    hotpot, code, summary = (json.loads(first[d][0]) for d in ("hotpotqa", "lcc", "qmsum"))
    assert hotpot["_id"] == "hotpotqa-0" and hotpot["num_chunks"] == 3 and hotpot["selected_chunk"] in (0, 1, 2)
    assert (code["num_chunks"], code["selected_chunk"]) == (1, 0)  # lcc: the last chunk only
    assert summary["num_chunks"] == 3 and summary["selected_chunk"] is None
    assert summary["pred"].count("\n") == 2  # three chunk answers joined (the word tokenizer writes no newline)
    assert set(hotpot) == {"_id", "pred", "answers", "all_classes", "length", "num_chunks", "selected_chunk"}

    sent.clear()
    run.main(args(tmp_path, *datasets), llm=llm)  # no limit: only the items not done yet
    assert len(sent) == 2 + 1 + 1
    for dataset, count in (("hotpotqa", 3), ("lcc", 2), ("qmsum", 2)):
        done = lines(run_dir, dataset)
        assert len(done) == count and done[0] == first[dataset][0]
        assert [json.loads(line)["_id"] for line in done] == [f"{dataset}-{i}" for i in range(count)]

    sent.clear()
    run.main(args(tmp_path, *datasets), llm=llm)
    assert sent == []
    scores = score.main([str(run_dir)])
    assert sorted(scores) == ["hotpotqa", "lcc", "qmsum"] and all(0 <= s <= 100 for s in scores.values())


def test_vanilla_sends_the_same_ids_cut_in_the_middle(llm, sent, tmp_path):
    run_dir = run.main(args(tmp_path, "--datasets", "qmsum", "--limit", "1", "--vanilla"), llm=llm)
    assert run_dir.name == "tiny-plain-vanilla"
    item = run.read_jsonl(DATA / "data" / "qmsum.jsonl")[0]
    family = prompts.FAMILIES["plain"]
    full = prompts.build_prompt("qmsum", item, family, llm.tokenizer, idk=False).tokenize(llm.tokenizer).vanilla_ids
    limit = 512 - prompts.MAX_NEW_TOKENS["qmsum"]
    assert len(full) > limit and [prompt for prompt, _ in sent] == [{"prompt_token_ids": full[: limit // 2] + full[-(limit // 2) :]}]
    row = json.loads(lines(run_dir, "qmsum")[0])
    assert (row["num_chunks"], row["selected_chunk"]) == (None, None) and row["pred"]


def test_longbench_e_run_scores_by_length(llm, sent, tmp_path):
    run_dir = run.main(args(tmp_path, "--datasets", "hotpotqa", "--e"), llm=llm)
    assert run_dir.name == "tiny-plain-oprm100-e" and len(lines(run_dir, "hotpotqa")) == 2
    buckets = score.main([str(run_dir), "--e"])["hotpotqa"]
    assert buckets["4-8k"] is None and buckets["8k+"] is None and 0 <= buckets["0-4k"] <= 100
