"""model.py: parity with transformers, the KV cache, strict loading, saving, tokenizers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from helpers import Opaque, hf_logits, left_padded_batch, make_hf_model, rewrite_weights, save_hf
from checkpoint import CheckpointError, convert_bin, from_pretrained, load_tokenizer, save_pretrained
from sample import KVCache

torch.set_num_threads(2)
ATOL = 1e-4  # fp32 logits vs transformers
KINDS = ["opt-preln", "opt-postln", "llama-tied", "llama-untied", "qwen2-tied", "qwen2-untied"]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    """(kind, transformers model, folder transformers saved)."""
    hf = make_hf_model(request.param)
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, folder


def test_logits_match_transformers(pair):
    kind, hf, folder = pair
    ids = torch.randint(3, 99, (2, 17), generator=torch.Generator().manual_seed(1))
    ours, _ = from_pretrained(folder)(ids)
    torch.testing.assert_close(ours, hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_left_padded_logits_match_transformers(pair):
    kind, hf, folder = pair
    pad = hf.config.pad_token_id
    ids, mask = left_padded_batch([9, 4, 12], pad_id=pad)
    ours, _ = from_pretrained(folder)(ids, attention_mask=mask)
    ref = hf_logits(hf, ids, mask)
    real = mask.bool()  # padding positions' outputs are meaningless in both
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["no-model-prefix", "two-shards", "tied-head-present"])
@pytest.mark.parametrize("kind", ["opt-preln", "opt-postln"])
def test_opt_checkpoint_variants_load(kind, variant, tmp_path):
    hf = make_hf_model(kind)
    folder = save_hf(hf, tmp_path / "m")
    if variant == "no-model-prefix":  # the original facebook/opt-* checkpoints say decoder.*, not model.decoder.*
        rewrite_weights(folder, rename=lambda k: k.removeprefix("model."), add={"decoder.version": torch.tensor([1.0])})
    elif variant == "two-shards":
        rewrite_weights(folder, shards=2)
        assert not (folder / "model.safetensors").exists()
    else:
        rewrite_weights(folder, add={"lm_head.weight": hf.lm_head.weight.detach().clone()})
    ids = torch.randint(3, 99, (2, 11), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(from_pretrained(folder)(ids)[0], hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_llama_two_shards_load(tmp_path):
    hf = make_hf_model("llama-untied")
    folder = save_hf(hf, tmp_path / "m")
    rewrite_weights(folder, shards=2)
    ids = torch.randint(3, 99, (1, 8))
    torch.testing.assert_close(from_pretrained(folder)(ids)[0], hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_greedy_tokens_equal_transformers(pair):
    kind, hf, folder = pair
    model = from_pretrained(folder)
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(3))
    ref = hf.generate(ids, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=hf.config.pad_token_id)
    out = ids
    for _ in range(12):
        out = torch.cat([out, model(out)[0][:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ref)


# -----------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decode_equals_full_forward(kind, tmp_path):
    """Prefill a left-padded batch (all positions' logits, or the last position's: last_only), decode 6
    tokens one at a time; every step's logits equal a full forward over the whole sequence so far (fp32,
    atol 1e-5)."""
    model = from_pretrained(save_hf(make_hf_model(kind), tmp_path))
    ids, mask = left_padded_batch([7, 3, 10], pad_id=0)
    new = torch.randint(3, 99, (3, 6), generator=torch.Generator().manual_seed(4))
    cache = KVCache(model.cfg, batch_size=3, max_seq_len=32)
    with torch.no_grad():
        logits = model.prefill(ids, cache, mask, last_only=False)
        full, _ = model(ids, attention_mask=mask)
        real = mask.bool()
        torch.testing.assert_close(logits[real], full[real], atol=1e-5, rtol=0)
        last = model.prefill(ids, KVCache(model.cfg, batch_size=3, max_seq_len=32), mask)
        assert last.shape == (3, 1, model.cfg.vocab_size)  # a prefill's head runs on the last position alone
        torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
        for t in range(new.shape[1]):
            step = model.decode_step(new[:, t:t + 1], cache)
            seq = torch.cat([ids, new[:, :t + 1]], 1)
            seq_mask = torch.cat([mask, torch.ones(3, t + 1, dtype=mask.dtype)], 1)
            full, _ = model(seq, attention_mask=seq_mask)
            torch.testing.assert_close(step[:, 0], full[:, -1], atol=1e-5, rtol=0)
    assert cache.length == ids.shape[1] + new.shape[1]


def greedy_with_cache(model, ids, mask, n_steps, how):
    """Greedy tokens of a left-padded batch, decoding one token at a time through the cache, `how`:
    "static" (attend over all slots under the validity mask), "filled" (the filled slots only), or
    "masked" (each step through the prefill path with an attention mask)."""
    cache = KVCache(model.cfg, ids.shape[0], ids.shape[1] + n_steps, static=how == "static")
    out = []
    with torch.no_grad():
        logits = model.prefill(ids, cache, mask, last_only=False)
        for _ in range(n_steps):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
            logits = (model.prefill(tok, cache, torch.ones_like(tok), last_only=False) if how == "masked"
                      else model.decode_step(tok, cache))
    return torch.cat(out, 1)


@pytest.mark.parametrize("kind", ["opt-preln", "llama-untied"])
def test_static_decode_step_gives_the_same_tokens(kind, tmp_path):
    """The fixed-shape decode step (index_copy_ at a device-side slot, all slots under the validity mask,
    RoPE from a precomputed table) writes the same 16 greedy tokens as the filled-slot step and as the
    slicing, masked path; unwritten slots stay zero."""
    model = from_pretrained(save_hf(make_hf_model(kind), tmp_path))
    with torch.no_grad():  # flatten the random init so that greedy tokens vary
        model.embed_tokens.weight.mul_(0.3)
    ids, mask = left_padded_batch([5, 9, 3, 7], pad_id=model.cfg.pad_token_id)
    static = greedy_with_cache(model, ids, mask, 16, "static")
    assert len(set(static.flatten().tolist())) > 1  # not a constant sequence
    assert torch.equal(static, greedy_with_cache(model, ids, mask, 16, "filled"))
    assert torch.equal(static, greedy_with_cache(model, ids, mask, 16, "masked"))


@pytest.mark.parametrize("kind", ["opt-postln", "llama-untied"])
def test_repeated_prompt_cache_equals_separate_prefills(kind, tmp_path):
    """One prefill expanded to N rows, then N different continuations: same logits as N prefills."""
    model = from_pretrained(save_hf(make_hf_model(kind), tmp_path))
    N = 4
    prompt = torch.randint(3, 99, (1, 9), generator=torch.Generator().manual_seed(5))
    cont = torch.randint(3, 99, (N, 3), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = KVCache(model.cfg, batch_size=1, max_seq_len=16)
        model.prefill(prompt, cache)
        cache = cache.repeat_rows(N)
        expanded = torch.cat([model.decode_step(cont[:, t:t + 1], cache) for t in range(3)], 1)
        separate = KVCache(model.cfg, batch_size=N, max_seq_len=16)
        model.prefill(prompt.expand(N, -1), separate)
        reference = torch.cat([model.decode_step(cont[:, t:t + 1], separate) for t in range(3)], 1)
    torch.testing.assert_close(expanded, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("keep", [[0, 2], [1, 2], [1]])
def test_select_rows_keeps_the_chosen_chains(keep, tmp_path):
    """Dropping rows mid-decode (kept rows move forward in place) leaves the kept rows' next two steps
    equal to decoding the full batch."""
    model = from_pretrained(save_hf(make_hf_model("llama-tied"), tmp_path))
    ids, mask = left_padded_batch([5, 8, 6])
    steps = torch.tensor([[[7], [8], [9]], [[10], [11], [12]], [[13], [14], [15]]])
    with torch.no_grad():
        cache = KVCache(model.cfg, 3, 16)
        model.prefill(ids, cache, mask)
        full = torch.cat([model.decode_step(s, cache) for s in steps], 1)
        cache = KVCache(model.cfg, 3, 16)
        model.prefill(ids, cache, mask)
        model.decode_step(steps[0], cache)
        cache = cache.select_rows(keep)
        kept = torch.cat([model.decode_step(s[keep], cache) for s in steps[1:]], 1)
    torch.testing.assert_close(kept, full[keep, 1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_shared_prefix_cache_equals_full_forward(kind, tmp_path):
    """Rows continuing one shared prefix cache (never copied per row): a left-padded prefill of 3 questions
    after it, each repeated to 2 chains, 4 decode steps, a row dropped after the second -- every step's
    logits equal a full forward over prefix + question + tokens so far (fp32, atol 1e-5)."""
    model = from_pretrained(save_hf(make_hf_model(kind), tmp_path))
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(3, 99, (1, 6), generator=g)
    ids, mask = left_padded_batch([4, 7, 2], pad_id=model.cfg.pad_token_id)
    new = torch.randint(3, 99, (6, 4), generator=g)
    questions = [ids[b, mask[b].bool()].tolist() for b in range(3)]
    rows = [b // 2 for b in range(6)]  # chain r continues question r // 2

    def reference(t, keep):
        """Last-position logits of the full sequences of rows `keep` after t decoded tokens."""
        seqs = [prefix[0].tolist() + questions[rows[r]] + new[r, :t].tolist() for r in keep]
        T = max(map(len, seqs))
        full_ids = torch.tensor([[0] * (T - len(x)) + x for x in seqs])
        full_mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in seqs])
        return model(full_ids, attention_mask=full_mask)[0][:, -1]

    with torch.no_grad():
        header = KVCache(model.cfg, 1, 6)
        model.prefill(prefix, header)
        cache = KVCache(model.cfg, 3, ids.shape[1] + 4, shared=header)
        logits = model.prefill(ids, cache, mask, last_only=False)
        torch.testing.assert_close(logits[:, -1].repeat_interleave(2, 0), reference(0, range(6)), atol=1e-5, rtol=0)
        cache, keep = cache.repeat_rows(2), list(range(6))
        for t in range(4):
            step = model.decode_step(new[keep, t:t + 1], cache)
            torch.testing.assert_close(step[:, 0], reference(t + 1, keep), atol=1e-5, rtol=0)
            if t == 1:  # chain 3 is done: it leaves the running batch
                keep = [0, 1, 2, 4, 5]
                cache = cache.select_rows([0, 1, 2, 4, 5])
    assert header.length == 6 and cache.k[0].shape[2] == ids.shape[1] + 4  # rows hold no copy of the prefix


# -----------------------------------------------------------------------------
# Strict loading: bad input names the tensor or file


@pytest.fixture
def llama_folder(tmp_path):
    return save_hf(make_hf_model("llama-untied"), tmp_path / "m")


def test_missing_tensor_is_named(llama_folder):
    rewrite_weights(llama_folder, drop={"model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor: layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(llama_folder)


def test_untied_head_missing_is_named(llama_folder):
    rewrite_weights(llama_folder, drop={"lm_head.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor: lm_head\.weight"):
        from_pretrained(llama_folder)


def test_unexpected_tensor_is_named(llama_folder):
    rewrite_weights(llama_folder, add={"model.layers.0.self_attn.bogus.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor: layers\.0\.self_attn\.bogus\.weight"):
        from_pretrained(llama_folder)


def test_wrong_shape_is_named(llama_folder):
    state = load_file(str(llama_folder / "model.safetensors"))
    rewrite_weights(llama_folder, add={"model.norm.weight": torch.ones(31)})
    assert state["model.norm.weight"].shape == (32,)
    with pytest.raises(CheckpointError, match=r"wrong shape: norm\.weight: checkpoint \(31,\) vs model \(32,\)"):
        from_pretrained(llama_folder)


def test_unknown_model_type_is_named(llama_folder):
    cfg = json.loads((llama_folder / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (llama_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported model_type 'gpt_neox'"):
        from_pretrained(llama_folder)


def test_folder_without_weights_is_named(llama_folder):
    (llama_folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        from_pretrained(llama_folder)


def test_corrupt_safetensors_names_the_file(llama_folder):
    path = llama_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        from_pretrained(llama_folder)


def test_pytorch_bin_only_is_refused_then_converted(tmp_path):
    hf = make_hf_model("opt-preln")
    folder = save_hf(hf, tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"(?s)only pytorch_model\.bin.*python checkpoint\.py convert-bin"):
        from_pretrained(folder)
    convert_bin(folder)
    ids = torch.randint(3, 99, (1, 7))
    torch.testing.assert_close(from_pretrained(folder)(ids)[0], hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_convert_bin_refuses_pickled_code(tmp_path):
    torch.save({"x": Opaque()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused by torch\.load\(weights_only=True\)"):
        convert_bin(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


# -----------------------------------------------------------------------------
# Saving


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trips_through_transformers(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = from_pretrained(save_hf(make_hf_model(kind), tmp_path / "src"))
    save_pretrained(ours, tmp_path / "out")
    assert not (tmp_path / "out.tmp").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = torch.randint(3, 99, (2, 10))
    torch.testing.assert_close(hf_logits(back, ids), ours(ids)[0], atol=ATOL, rtol=0)
    # and through us again, exactly
    assert torch.equal(from_pretrained(tmp_path / "out")(ids)[0], ours(ids)[0])


def test_save_pretrained_replaces_an_existing_folder(tmp_path):
    ours = from_pretrained(save_hf(make_hf_model("llama-tied"), tmp_path / "src"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("x")
    save_pretrained(ours, tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "stale.txt" not in names and {"config.json", "model.safetensors"} <= names


# -----------------------------------------------------------------------------
# Tokenizer


def test_opt_style_vocab_merges_tokenizer_equals_transformers(tmp_path):
    """An OPT-layout tokenizer folder (vocab.json + merges.txt, </s> prepended as BOS)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer

    text = ["The answer must be a place where beavers get their supplies.", "So the answer is (c) wooded area.",
            "Q: What do people use to absorb extra ink from a fountain pen?", "Answer Choices: (a) shirt pocket"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.save_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_prefix_space": False, "bos_token": "</s>", "eos_token": "</s>",
        "unk_token": "</s>", "pad_token": "<pad>", "errors": "replace"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}))
    ours = load_tokenizer(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    for s in text[:4] + ["  two  spaces, digits 12345 and ünïcödé</s>", ""]:
        assert ours.encode(s).ids == ref(s)["input_ids"], s
        assert ours.encode(s).ids[0] == 2  # </s> as BOS


def test_tokenizer_json_equals_transformers(pair):
    from transformers import AutoTokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    kind, hf, folder = pair
    vocab = {chr(ord("a") + i): i for i in range(26)} | {"<unk>": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(folder / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(folder)
    assert load_tokenizer(folder).encode("hello").ids == ref("hello", add_special_tokens=False)["input_ids"]


def test_folder_without_tokenizer_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json, nor vocab.json"):
        load_tokenizer(tmp_path)


FAULTS_PER_STEP = """
import resource, sys, torch, cli
if sys.argv[1] == "keep":
    cli.keep_freed_memory(torch.device("cpu"))
def step():  # a training step's worth of activations: allocated and written, then all freed together
    xs = [torch.ones(2**20) for _ in range(64)]  # 64 x 4 MiB
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_refaulting_each_step():
    """glibc hands 4 MiB blocks back to the OS on free (here with its mmap threshold pinned at the default
    128 KiB, since its adaptive threshold makes the default case vary run to run), so every step faults
    its 256 MiB in again (65k pages); with keep_freed_memory() the third step reuses them."""
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True,
                                       check=True, cwd=ROOT, env=env).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 60_000 and faults["keep"] < 5_000, faults


@pytest.mark.parametrize("chunk_rows", [1000, 7, 1])
def test_chunked_head_and_cross_entropy_equal_the_plain_ones(chunk_rows, monkeypatch):
    """losses.linear_cross_entropy (the head + loss in row chunks, gradients taken chunk by chunk) against
    F.cross_entropy(F.linear(x, w)): the same loss and gradients for x and w (fp32, 1e-5), in one chunk or many;
    the same loss without autograd; zero rows give a zero loss whose gradients are zero."""
    import losses as model_py

    V = 50
    monkeypatch.setattr(model_py, "CE_CHUNK_ELEMENTS", chunk_rows * V)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 16, generator=g, requires_grad=True)
    w = torch.randn(V, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (23,), generator=g)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w).float(), labels)
    ref_gx, ref_gw = torch.autograd.grad(ref * 3.0, (x, w))
    loss = model_py.linear_cross_entropy(x, w, labels)
    gx, gw = torch.autograd.grad(loss * 3.0, (x, w))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx, ref_gx, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model_py.linear_cross_entropy(x, w, labels), ref, atol=1e-5, rtol=0)
    empty = model_py.linear_cross_entropy(x[:0], w, labels[:0])
    assert empty.item() == 0 and not torch.autograd.grad(empty, w)[0].any()


def test_training_forward_with_host_target_indices_equals_the_boolean_mask(tmp_path):
    """forward(idx, targets, target_idx=...) (indices computed on the host: no device->host sync) gives the loss
    of forward(idx, targets) (which finds them itself) and of a plain cross-entropy over the full logits."""
    model = from_pretrained(save_hf(make_hf_model("llama-untied"), tmp_path))
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(3, 99, (3, 9), generator=g)
    targets = torch.randint(3, 99, (3, 9), generator=g)
    targets[:, :4] = -100
    targets[2, 6:] = -100
    _, loss = model(idx, targets)
    _, host = model(idx, targets, target_idx=(targets.flatten() != -100).nonzero()[:, 0])
    logits, _ = model(idx)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    assert torch.equal(loss, host)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
