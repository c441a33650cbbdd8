"""The real teachers (experiments/fetch_teachers.py), converted by convert_gguf.py, against transformers loading
the same GGUF: logits within 1e-3 and 16 identical greedy tokens on a CSQA prompt. Skipped where the teacher
has not been fetched (CI never downloads it)."""

import json

import pytest
import torch

from checkpoint import from_pretrained, load_tokenizer
from fileio import cache_dir
from data import DEFAULT_DEV, read_corpus
from scotd import format_query

pytestmark = pytest.mark.real
TEACHERS = ["Qwen2.5-Coder-0.5B-Instruct", "Qwen2.5-Coder-1.5B-Instruct"]


@pytest.mark.parametrize("name", TEACHERS)
def test_converted_teacher_matches_transformers_on_the_same_gguf(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = cache_dir() / "teachers"
    record = root / f"{name}.json"
    if not (record.exists() and (root / name / "config.json").exists()):
        pytest.skip(f"{name} not fetched (python experiments/fetch_teachers.py)")
    gguf_file = json.loads(record.read_text())["file"]
    ours, tok = from_pretrained(root / name), load_tokenizer(root / name)
    ref = AutoModelForCausalLM.from_pretrained(root, gguf_file=gguf_file, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(root, gguf_file=gguf_file)
    r = read_corpus(DEFAULT_DEV)[0]
    prompt = format_query(r["question"], r["choices"])
    ids = tok.encode(prompt).ids
    assert ids == ref_tok(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], ref(ids).logits, atol=1e-3, rtol=0)
        out = ids
        for _ in range(16):
            out = torch.cat([out, ours(out)[0][:, -1:].argmax(-1)], 1)
        expected = ref.generate(ids, do_sample=False, max_new_tokens=16, min_new_tokens=16)
    assert torch.equal(out, expected)
