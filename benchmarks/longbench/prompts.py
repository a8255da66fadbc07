"""LongBench prompts as the OPRM authors ran them: START + PRE + CONTEXT + QUERY + END.

The templates are LongBench's own (THUDM/LongBench ``config/dataset2prompt.json``, English
tasks). The OPRM authors' changes to them (assafbk/OPRM ``eval_longbench_oprm.py``) are kept as
string edits on top, so each can be read against the original: the IDK variants that let a chunk
answer "Error", and two families' own wordings. PRE is the template before ``{context}``, QUERY
the part after it with ``{input}`` filled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_oprm import OPRMPrompt

TEMPLATES = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
DATASETS = tuple(TEMPLATES)
DATASETS_E = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)

# The authors' generation lengths (NOTES §1), not LongBench's dataset2maxlen.
MAX_NEW_TOKENS = {
    **dict.fromkeys(DATASETS, 20),
    **dict.fromkeys(("lcc", "repobench-p"), 40),
    **dict.fromkeys(("qmsum", "multi_news", "samsum"), 250),
    "gov_report": 500,
}
SUMMARIZE = ("gov_report", "qmsum", "multi_news")  # every chunk answers; answers joined in chunk order


def mode(dataset: str) -> str:
    """OPRM mode per task: code completion needs the code just before the cursor."""
    return "summarize" if dataset in SUMMARIZE else "last" if dataset == "lcc" else "select"


IDK_SENTENCE = ' If the answer does not exist in the passages, return "Error".'
# Applied with the IDK filter only: a chunk that lacks the answer should start with "Error".
IDK_EDITS = {
    **{
        name: ("\n\nQuestion:", IDK_SENTENCE + "\n\nQuestion:")
        for name in ("narrativeqa", "hotpotqa", "2wikimqa", "musique", "multifieldqa_en")
    },
    # "Error" is one token where "unanswerable" is several; the scorer maps it back.
    "qasper": ('"unanswerable"', '"Error"'),
    "passage_retrieval_en": (
        "\n\nThe answer is: ",
        ' If the abstract is not from any of the paragraphs, write "Error".\n\nThe answer is: ',
    ),
}
_ONLY_ANSWER = " Only give me the answer and do not output any other words."
# RecurrentGemma's summaries and Falcon3-Mamba's code completion, as the authors prompted them.
_SUMMARY_EDITS = {
    "gov_report": ("\n\nSummary:", _ONLY_ANSWER + "\n\nSummary:"),
    "multi_news": ("\n\nSummary:", _ONLY_ANSWER + "\n\nSummary:"),
    "qmsum": ("\n\nQuery:", _ONLY_ANSWER + "\n\nQuery:"),
}
_CODE_EDITS = {
    name: (
        "Next line of code:\n",
        "Now complete the next line of code. Only give me the answer and do not output any other words:\n",
    )
    for name in ("lcc", "repobench-p")
}


@dataclass(frozen=True)
class Family:
    """A model family's chat header as token ids (NOTES §1 and the authors' code).

    ``idk`` None means: the tokenizer's id of "Error" if that is one token, else no filter.
    """

    start: tuple[int, ...] = ()
    pre_end: tuple[int, ...] = ()  # after PRE, before the context
    end: tuple[int, ...] = ()
    idk: tuple[int, ...] | None = None
    edits: dict[str, tuple[str, str]] = field(default_factory=dict)


_FALCON_START = (8, 9, 5584, 193)  # <|begin_of_text|><|im_start|>user\n
_FALCON_END = (10, 193, 9, 7, 193)  # <|im_end|>\n<|im_start|>assistant\n
FAMILIES = {
    "falcon-mamba": Family(_FALCON_START, (), _FALCON_END, idk=(5801,)),
    "falcon3-mamba": Family(_FALCON_START, (), _FALCON_END, idk=(), edits=_CODE_EDITS),
    "recurrentgemma": Family(
        (2, 106, 1645, 108),  # <bos><start_of_turn>user\n
        (),
        (107, 108, 106, 2516, 108),  # <end_of_turn>\n<start_of_turn>model\n
        idk=(2876,),
        edits=_SUMMARY_EDITS,
    ),
    "rwkv6": Family(
        (62994, 59, 33),  # "Instruction: "
        (261, 33192, 59, 33),  # "\n\nInput: "
        (261, 53671, 59),  # "\n\nResponse:"
        idk=(33079, 36638),  # "Error", " Error"
    ),
    "plain": Family(),  # no header: the tokenizer's own BOS, as a plain prompt gets
}


def idk_token_ids(family: Family, tokenizer) -> tuple[int, ...]:
    if family.idk is not None:
        return family.idk
    ids = tokenizer.encode("Error", add_special_tokens=False)
    return tuple(ids) if len(ids) == 1 else ()


def _edit(template: str, edit: tuple[str, str] | None) -> str:
    if edit is None:
        return template
    old, new = edit
    if old not in template:  # an edit that silently does nothing would change the benchmark unseen
        raise ValueError(f"prompt edit {old!r} does not occur in {template!r:.80}")
    return template.replace(old, new)


def template(dataset: str, family: Family, idk: bool) -> str:
    """LongBench's template with the family's edit and, when the IDK filter is on, the IDK edit."""
    text = _edit(TEMPLATES[dataset], family.edits.get(dataset))
    return _edit(text, IDK_EDITS.get(dataset)) if idk else text


def build_prompt(dataset: str, item: dict, family: Family, tokenizer, idk: bool) -> OPRMPrompt:
    """Prefix START + PRE and suffix QUERY + END as token ids, the context as text.

    Ids, not text, so the header is exact and BOS appears once: a family with a header
    carries its own BOS (where it has one); ``plain`` lets the tokenizer add it to PRE.
    """
    pre, query = template(dataset, family, idk).split("{context}")
    prefix = [*family.start, *tokenizer.encode(pre, add_special_tokens=not family.start), *family.pre_end]
    suffix = [*tokenizer.encode(query.format(input=item["input"]), add_special_tokens=False), *family.end]
    return OPRMPrompt(prefix, item["context"], suffix)
