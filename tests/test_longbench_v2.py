"""LongBench v2 harness: the scorer against hand-computed accuracy, the prompt against pred.py's, and the
runner on a tiny model (OPRM and vanilla, each completing and then resuming)."""

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.longbench.prompts import FAMILIES
from benchmarks.longbench_v2 import run, score
from vllm_oprm.testing import BOS_ID, UNK_ID, build_tokenizer

from harness_engine import llm, sent  # noqa: F401 (fixtures)

DATA = Path(__file__).parent / "data" / "longbench_v2"

# tests/data/longbench_v2/pred/sample.jsonl, answer extracted by pred.py's rule, then judged:
#   s1  easy short  A  "The correct answer is (A)"                       -> A  right (parenthesized)
#   s2  easy short  B  "**The correct answer is (C)**"                   -> C  wrong (asterisks dropped first)
#   s3  hard short  C  "The correct answer is C."                        -> C  right (bare letter, 2nd pattern)
#   s4  hard medium D  "The correct answer is (insert answer here)"      -> None (template echoed)
#   s5  easy medium D  "...is B. On reflection, ...is (D)."              -> D  right (parenthesized wins anywhere)
#   s6  hard medium A  "the correct answer is (A)"                       -> None (case-sensitive)
#   s7  hard long   B  "The **correct** answer is (B)"                   -> B  right (asterisks inside)
#   s8  hard long   A  "I choose (A)."                                   -> None (no pattern)
#   s9  easy long   D  "The correct answer is (D)"                       -> D  right
#   s10 hard long   C  "The correct answer is (B)"                       -> B  wrong
EXTRACTED = ["A", "C", "C", None, "D", None, "B", None, "D", "B"]
# right: overall s1 s3 s5 s7 s9 = 5/10; easy s1 s5 s9 of s1 s2 s5 s9 = 3/4; hard s3 s7 of 6 = 2/6 = 33.33;
# short s1 s3 of 3 = 66.67; medium s5 of 3 = 33.33; long s7 s9 of 4 = 2/4; all rounded to one decimal.
# partial.jsonl: two easy short items, p1 "The correct answer is (A)" right, p2 "" (no answer) wrong: 1/2,
# the other buckets empty (result.py would divide by zero).
EXPECTED = {
    "partial": {"overall": 50.0, "easy": 50.0, "hard": None, "short": 50.0, "medium": None, "long": None, "items": 2},
    "sample": {"overall": 50.0, "easy": 75.0, "hard": 33.3, "short": 66.7, "medium": 33.3, "long": 50.0, "items": 10},
}
# --compensated: the unextracted s4 (hard medium), s6 (hard medium), s8 (hard long) score 1/4 each:
# overall 5.75/10; easy unchanged 75; hard 2.75/6 = 45.83; short unchanged 66.7; medium 1.5/3 = 50;
# long 2.25/4 = 56.25, which Python's round gives as 56.2 (56.25 is exact in binary: half to even).
# partial: p2's empty response is unextracted too: 1.25/2 = 62.5.
EXPECTED_COMPENSATED = {
    "partial": {"overall": 62.5, "easy": 62.5, "hard": None, "short": 62.5, "medium": None, "long": None, "items": 2},
    "sample": {"overall": 57.5, "easy": 75.0, "hard": 45.8, "short": 66.7, "medium": 50.0, "long": 56.2, "items": 10},
}


def scored(tmp_path, *flags):
    pred_dir = tmp_path / "pred"
    shutil.copytree(DATA / "pred", pred_dir)  # score writes result.json next to the predictions
    scores = score.main([str(pred_dir), *flags])
    assert json.loads((pred_dir / "result.json").read_text()) == scores
    return scores


def test_answers_are_extracted_by_pred_py_rule():
    rows = run.read_jsonl(DATA / "pred" / "sample.jsonl")
    assert [score.extract_answer(row["response"]) for row in rows] == EXTRACTED


def test_accuracy_equals_hand_computed(tmp_path, capsys):
    assert scored(tmp_path) == EXPECTED
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["model", *score.COLUMNS, "items"]
    assert table[1].split() == ["partial", "50.0", "50.0", "-", "50.0", "-", "-", "2"]


def test_compensated_accuracy_equals_hand_computed(tmp_path):
    assert scored(tmp_path, "--compensated") == EXPECTED_COMPENSATED


class CharTokenizer:
    """One id per character, so token ids spell the text back exactly."""

    def encode(self, text, add_special_tokens=True):
        return [ord(ch) for ch in text]


def test_prompt_is_pred_py_prompt_split_at_the_document():
    item = run.read_items(DATA / "data.json")[0]
    official = run.TEMPLATE.replace("$DOC$", item["context"].strip())  # pred.py's fill, field by field
    for placeholder, field in run.FIELDS:
        official = official.replace(placeholder, item[field].strip())
    prompt = run.build_prompt(item, FAMILIES["plain"], CharTokenizer())
    assert "".join(map(chr, prompt.prefix)).endswith("answer the question below.\n\n<text>\n")
    assert prompt.context == item["context"].strip() != item["context"]
    assert "".join(map(chr, prompt.prefix)) + prompt.context + "".join(map(chr, prompt.suffix)) == official
    falcon = FAMILIES["falcon-mamba"]
    header = run.build_prompt(item, falcon, CharTokenizer())
    assert header.prefix == [*falcon.start, *prompt.prefix] and header.suffix == [*prompt.suffix, *falcon.end]


def test_word_tokenizer_prompt_has_one_bos(tmp_path):
    tokenizer = build_tokenizer(str(tmp_path))
    item = run.read_items(DATA / "data.json")[0]
    prompt = run.build_prompt(item, FAMILIES["plain"], tokenizer).tokenize(tokenizer)
    assert prompt.prefix_ids == [BOS_ID] + [UNK_ID] * 11  # "Please read ... below. <text>", unknown words
    assert prompt.vanilla_ids.count(BOS_ID) == 1 and len(prompt.context_ids) == 250


def test_data_reads_as_json_list_or_jsonl(tmp_path):
    items = run.read_items(DATA / "data.json")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(item) + "\n" for item in items))
    assert run.read_items(jsonl) == items and [i["_id"] for i in items] == ["lbv2-0", "lbv2-1", "lbv2-2"]


def test_missing_data_stops_before_the_engine(tmp_path):
    missing = ["--data", str(tmp_path / "data.json"), "--model", "m", "--family", "plain", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="missing data file"):
        run.main(missing)


def args(tmp_path, *extra):
    return ["--data", str(DATA / "data.json"), "--model", "tiny", "--family", "plain", "--out-dir", str(tmp_path),
            "--chunk-size", "100", "--batch-size", "2", *extra]


def ids(out_path):
    return [row["_id"] for row in run.read_jsonl(out_path)]


def test_oprm_run_completes_and_resumes(llm, sent, tmp_path):
    out_path = run.main(args(tmp_path, "--limit", "2"), llm=llm)
    assert out_path == tmp_path / "tiny-plain-oprm100.jsonl" and ids(out_path) == ["lbv2-0", "lbv2-1"]
    config = sent[0][1]
    assert (config.mode, config.idk_token_ids, config.chunk_size) == ("select", (), 100)  # IDK filter off
    first = out_path.read_text().splitlines()
    rows = [json.loads(line) for line in first]
    assert [row["num_chunks"] for row in rows] == [3, 5]  # 250 and 450 document words, 100 per chunk
    assert all(0 <= row["selected_chunk"] < row["num_chunks"] for row in rows)
    assert set(rows[0]) == {"_id", "domain", "sub_domain", "difficulty", "length", "answer", "response", "pred",
                            "judge", "num_chunks", "selected_chunk"}
    assert rows[0]["pred"] is None and rows[0]["judge"] is False  # random words never name a choice

    sent.clear()
    run.main(args(tmp_path), llm=llm)  # no limit: only the item not done yet
    assert len(sent) == 1 and ids(out_path) == ["lbv2-0", "lbv2-1", "lbv2-2"]
    assert out_path.read_text().splitlines()[:2] == first
    sent.clear()
    run.main(args(tmp_path), llm=llm)
    assert sent == [] and len(ids(out_path)) == 3
    result = score.main([str(tmp_path)])["tiny-plain-oprm100"]
    assert result["items"] == 3 and result["overall"] == 0.0 and result["medium"] == 0.0


def test_vanilla_run_cuts_in_the_middle_and_resumes(llm, sent, tmp_path):
    out_path = run.main(args(tmp_path, "--limit", "2", "--vanilla"), llm=llm)
    assert out_path.name == "tiny-plain-vanilla.jsonl" and ids(out_path) == ["lbv2-0", "lbv2-1"]
    items = run.read_items(DATA / "data.json")
    full = [run.build_prompt(i, FAMILIES["plain"], llm.tokenizer).tokenize(llm.tokenizer).vanilla_ids for i in items]
    limit = 512 - run.MAX_NEW_TOKENS  # 384: 12 + 250 + 44 tokens fit, 12 + 450 + 44 do not
    assert len(full[0]) == 306 and len(full[1]) == 506
    assert [prompt for prompt, _ in sent] == [
        {"prompt_token_ids": full[0]}, {"prompt_token_ids": full[1][: limit // 2] + full[1][-(limit // 2) :]}
    ]
    assert all(config is None for _, config in sent)
    rows = run.read_jsonl(out_path)
    assert all(row["num_chunks"] is None and row["selected_chunk"] is None for row in rows)

    sent.clear()
    run.main(args(tmp_path, "--vanilla"), llm=llm)
    assert [prompt for prompt, _ in sent] == [{"prompt_token_ids": full[2]}] and len(ids(out_path)) == 3
    sent.clear()
    run.main(args(tmp_path, "--vanilla"), llm=llm)
    assert sent == [] and len(ids(out_path)) == 3
