"""The detokenizer patch: a chunk request's text is the same whether its stream is primed with
the whole prompt (vLLM) or with the prompt's last few tokens (the patch).

Prompts are real text (valid UTF-8, as a prompt sent to vLLM is); the generated tokens are random,
multi-byte pieces and invalid sequences included."""

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")

from vllm_oprm.testing import build_tokenizer  # noqa: E402


PIECES = ["Zürich", "straße", "東京", "タワー", "naïve", "café", "—", "ünïcödé", "the", "quick", "fox", "dog", "🙂"]


def byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(PIECES) * 3], trainer)
    return tok


def streamed(tokenizer, prompt, new, prime):
    stream = tokenizers.decoders.DecodeStream(ids=prime(prompt), skip_special_tokens=False)
    return "".join(stream.step(tokenizer, t) or "" for t in new)


@pytest.mark.parametrize("kind", ["word level", "byte-level BPE"])
def test_prompt_tail_priming_prints_the_same_text(tmp_path, kind):
    from vllm_oprm.patches.vllm_0_32_detokenizer_prompt_tail import PROMPT_TAIL

    if kind == "word level":
        tokenizer, pieces = build_tokenizer(str(tmp_path))._tokenizer, [f"w{i}" for i in range(251)]
    else:
        tokenizer, pieces = byte_level_bpe(), PIECES
    vocab = tokenizer.get_vocab_size()
    rng = torch.Generator().manual_seed(0)
    one_token_differs = 0
    for _ in range(200):
        text = " ".join(pieces[i] for i in torch.randint(0, len(pieces), (150,), generator=rng).tolist())
        prompt = tokenizer.encode(text).ids
        new = torch.randint(0, vocab, (20,), generator=rng).tolist()
        whole = streamed(tokenizer, prompt, new, lambda ids: ids)
        assert streamed(tokenizer, prompt, new, lambda ids: ids[-PROMPT_TAIL:]) == whole
        one_token_differs += streamed(tokenizer, prompt, new, lambda ids: ids[-1:]) != whole
    if kind == "byte-level BPE":  # a tail that cuts a character in two does print differently
        assert one_token_differs > 0
