"""Tiny random HF checkpoints written by transformers itself, for parity tests."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VOCAB = 99


class Opaque:
    """An arbitrary Python object: pickling it into a .bin must be refused on load (weights_only)."""


def hf_config(kind, **overrides):
    from transformers import LlamaConfig, OPTConfig

    if kind.startswith("opt"):
        kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                  max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True,
                  pad_token_id=1, bos_token_id=2, eos_token_id=2)
        if kind == "opt-postln":  # the OPT-350m layout
            kw.update(do_layer_norm_before=False, word_embed_proj_dim=16)
        kw.update(overrides)
        return OPTConfig(**kw)
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rope_theta=100000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=kind.endswith("-tied"), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    if kind.startswith("qwen2"):
        from transformers import Qwen2Config
        return Qwen2Config(**(kw | {"rope_theta": 1e6}))
    return LlamaConfig(**kw)


def make_hf_model(kind, seed=0, **overrides):
    """A transformers model with every parameter random (LayerNorm/RMSNorm weights and biases too)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, **overrides), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def save_hf(model, folder):
    model.save_pretrained(folder)
    return Path(folder)


def rewrite_weights(folder, rename=lambda k: k, drop=(), add=None, shards=1):
    """Rewrite a saved folder's safetensors: rename/drop/add keys, or split into `shards` files."""
    folder = Path(folder)
    state = load_file(str(folder / "model.safetensors"))
    state = {rename(k): v for k, v in state.items() if k not in drop}
    state.update(add or {})
    (folder / "model.safetensors").unlink()
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def left_padded_batch(lengths, pad_id=0, vocab=VOCAB, seed=0):
    """(ids, mask) for rows of the given lengths, left-padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


def hf_logits(hf, ids, mask=None):
    """transformers' logits; RoPE models are given positions that skip left padding, as OPT computes itself."""
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = mask
        if hf.config.model_type != "opt":
            kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(ids, **kwargs).logits


def tiny_student(folder, model_type="llama", vocab_size=384, seed=0, positions=512, soft=False):
    """A tiny random student with a real byte-level BPE tokenizer trained on the bundled corpus,
    written as an HF-layout folder by our own save_pretrained. soft: its final norm scaled by 0.1, so that its
    next-token distributions spread over many tokens (at random init, with tied embeddings, it puts all but
    1e-17 on the token it reads): a teacher worth distilling."""
    from tokenizers import ByteLevelBPETokenizer

    from data import DEFAULT_TRAIN, read_corpus
    from checkpoint import save_pretrained
    from model import Config, Transformer
    from scotd import format_query

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = read_corpus(DEFAULT_TRAIN)[:300]
    text = [format_query(r["question"], r["choices"]) for r in records] + [x["text"] for r in records for x in r["rationales"]]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text + [" So the answer is (a) (b) (c) (d) (e).\n\n"], vocab_size=vocab_size,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    src = folder.with_name(folder.name + "-tok")
    src.mkdir(exist_ok=True)
    bpe.save(str(src / "tokenizer.json"))
    if model_type == "llama":
        hf = dict(model_type="llama", vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                  architectures=["LlamaForCausalLM"])
    else:
        hf = dict(model_type="opt", vocab_size=vocab_size, hidden_size=48, ffn_dim=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=positions, word_embed_proj_dim=48,
                  do_layer_norm_before=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                  architectures=["OPTForCausalLM"])
    cfg = Config.from_dict(hf)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    if soft:
        with torch.no_grad():
            model.norm.weight.mul_(0.1)
    save_pretrained(model, folder, tokenizer_from=src)
    return folder


def many_rationale_corpus(path):
    """20 bundled questions with 3 distinct rationales each (the PaLM one, and two variants of it)."""
    from data import DEFAULT_TRAIN, read_corpus, write_corpus
    records = [r for r in read_corpus(DEFAULT_TRAIN)[:40] if r["rationales"] and r["rationales"][0]["correct"]][:20]
    for r in records:
        first = r["rationales"][0]
        r["rationales"] = [first, first | {"text": "Think. " + first["text"]}, first | {"text": first["text"] + " Yes."}]
    write_corpus(records, path)
    return path


class Crash(Exception):
    """An injected fault."""


def counting_forward(monkeypatch, crash_at=None):
    """Count the model's passes (forward, prefill and decode_step all run Transformer._hidden); raise Crash in
    pass number crash_at (mid-decode: the fault lands in a batch)."""
    import model as model_py

    calls = [0]
    real = getattr(model_py.Transformer._hidden, "unpatched", model_py.Transformer._hidden)

    def hidden(self, *a, **k):
        calls[0] += 1
        if calls[0] == crash_at:
            raise Crash(f"model pass {crash_at}")
        return real(self, *a, **k)

    hidden.unpatched = real
    monkeypatch.setattr(model_py.Transformer, "_hidden", hidden)
    return calls


def assert_loads_in_transformers(folder, reference, ids, text):
    """A converted folder, loaded by transformers: its logits equal the reference's (the same GGUF, loaded by
    transformers) on ids, and its tokenizer gives our ids for text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoint import load_tokenizer

    back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == load_tokenizer(folder).encode(text).ids


def tiny_pair(folder):
    """A tiny student and a teacher with the same tokenizer (trained on the same text) and other weights, both soft
    (tiny_student): the distillation tests' pair."""
    return tiny_student(Path(folder) / "student", soft=True), tiny_student(Path(folder) / "teacher", seed=1, soft=True)


def stop_after_first_batch(monkeypatch, module, name):
    """module.name (a function taking on_batch=): its first batch handed on, then Ctrl-C (KeyboardInterrupt)."""
    real = getattr(module, name)

    def stopping(*a, on_batch, **k):
        def once(*b):
            on_batch(*b)
            raise KeyboardInterrupt
        return real(*a, on_batch=once, **k)
    monkeypatch.setattr(module, name, stopping)
    return real


def signal_on_call(monkeypatch, module, name, nth, signum):
    """module.name raises a real signal (os.kill of this process) on its nth call, then runs as before."""
    import os

    real, calls = getattr(module, name), {"n": 0}

    def signalling(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signum)
        return real(*a, **k)
    monkeypatch.setattr(module, name, signalling)
    return real
