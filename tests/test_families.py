"""The families beyond OPT, Llama and Qwen2 -- Qwen3, Llama 3.x RoPE (llama3, linear, yarn), SmolLM3, Gemma 3 (text),
Mistral and Qwen2 with sliding windows -- each equal to transformers: tiny random models built and saved by
transformers inside the test, sequences longer than their sliding window. Logits to 1e-4 (fp32); greedy tokens
through the cached sampler equal generate()'s; one training step's loss and gradients equal (plain rows and
shared-prefix rows); what scotd saves loads in transformers with equal logits; a field scotd does not
implement is refused by name."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import families
from checkpoint import CheckpointError, from_pretrained, save_pretrained
from helpers import hf_logits, left_padded_batch, tiny_student
from sample import KVCache, SampleConfig, generate

torch.set_num_threads(2)
ATOL = 1e-4
WINDOW = 5
BASE = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)


def family_config(kind):
    import transformers as t

    if kind == "qwen3":  # head_dim 16, not hidden / heads = 8
        return t.Qwen3Config(**BASE, head_dim=16, tie_word_embeddings=False)
    if kind.startswith("llama-"):  # llama3 scaling: original context 16, so the three frequency bands all occur
        rope = {"llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16),
                "linear": dict(factor=2.0)}[kind.split("-")[1]]
        return t.LlamaConfig(**BASE, rope_parameters={"rope_type": kind.split("-")[1], "rope_theta": 10000.0, **rope})
    if kind == "qwen2-yarn":
        return t.Qwen2Config(**BASE, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                      "original_max_position_embeddings": 16})
    if kind == "qwen2-sliding":  # layers 1 and 2 sliding
        return t.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if kind == "mistral":
        return t.MistralConfig(**BASE, sliding_window=WINDOW)
    if kind == "smollm3":
        return t.SmolLM3Config(**BASE, no_rope_layers=[1, 0, 1])
    if kind == "gemma3":
        return t.Gemma3TextConfig(**BASE, head_dim=16, query_pre_attn_scalar=12, sliding_window=WINDOW,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  final_logit_softcapping=3.0)
    raise ValueError(kind)


KINDS = ["qwen3", "llama-llama3", "llama-linear", "qwen2-yarn", "qwen2-sliding", "mistral", "smollm3", "gemma3"]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    """(kind, transformers model with every parameter random, the folder transformers saved)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(family_config(request.param), attn_implementation="eager")
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
        if request.param == "gemma3":  # its embeddings are scaled by sqrt(hidden): smaller ones, varied greedy tokens
            hf.get_input_embeddings().weight.mul_(0.2)
    folder = tmp_path_factory.mktemp(request.param)
    hf.eval().save_pretrained(folder)
    return request.param, hf, folder


def test_the_families_knobs_are_read(pair):
    kind, _, folder = pair
    cfg = from_pretrained(folder).cfg
    expect = {"qwen3": dict(qk_norm=True, head_dim=16), "gemma3": dict(norm="rms1p", norm_place="sandwich",
              windows=(WINDOW, None, WINDOW), embed_scale=32 ** 0.5, attn_scale=12 ** -0.5, logit_softcap=3.0),
              "mistral": dict(windows=(WINDOW,) * 3), "qwen2-sliding": dict(windows=(None, WINDOW, WINDOW)),
              "llama-llama3": dict(), "llama-linear": dict(), "qwen2-yarn": dict(), "smollm3": dict()}[kind]
    assert {k: getattr(cfg, k) for k in expect} == expect
    if kind == "smollm3":
        assert cfg.ropes[1] is None and cfg.ropes[0] is not None
    if kind == "gemma3":
        assert (cfg.ropes[0].theta, cfg.ropes[1].theta) == (10000.0, 1e6)
    if kind.startswith(("llama-", "qwen2-yarn")):
        assert cfg.ropes[0].kind == kind.split("-")[1]


def test_logits_match_transformers_past_the_window(pair):
    kind, hf, folder = pair
    ids = torch.randint(3, 99, (2, 17), generator=torch.Generator().manual_seed(1))
    model = from_pretrained(folder)
    torch.testing.assert_close(model(ids)[0], hf_logits(hf, ids), atol=ATOL, rtol=0)
    ids, mask = left_padded_batch([9, 4, 13], pad_id=0)
    real = mask.bool()
    torch.testing.assert_close(model(ids, attention_mask=mask)[0][real], hf_logits(hf, ids, mask)[real], atol=ATOL, rtol=0)


def test_greedy_tokens_through_the_cached_sampler_equal_generate(pair):
    kind, hf, folder = pair
    model = from_pretrained(folder)
    prompt = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(3))
    ref = hf.generate(prompt, do_sample=False, max_new_tokens=14, min_new_tokens=14, pad_token_id=0)[0, 6:].tolist()
    ours = generate(model, None, [prompt[0].tolist()], SampleConfig(max_new_tokens=14, stop=()))[0][0]["tokens"]
    assert ours == ref and len(set(ref)) > 1


def examples():
    """Two questions (7 and 5 tokens) with 2 and 1 rationales longer than the window."""
    g = np.random.default_rng(0)
    q1, q2 = g.integers(3, 99, 7), g.integers(3, 99, 5)
    return [(np.concatenate([q, g.integers(3, 99, n)]).astype(np.int32), len(q)) for q, n in ((q1, 8), (q2, 6), (q1, 9))]


def grads(model, names=lambda k: k):
    return {names(k): p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("rows", ["plain", "shared-prefix", "packed"])
def test_a_training_step_has_the_loss_and_gradients_of_transformers(pair, rows):
    kind, hf, folder = pair
    model = from_pretrained(folder).train()
    hf.train()
    idx, targets, _ = data.collate(examples(), pad_id=0)
    hf.zero_grad()
    ref = F.cross_entropy(hf(idx).logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref.backward()
    hf.eval()
    if rows == "plain":
        _, loss = model(idx, targets)
    else:
        idx, targets, docs, branches, _ = data.layout(examples(), 0, 512, share=True, pack=rows == "packed")
        assert idx.shape[0] == (1 if rows == "packed" else 2)  # question 1's two rationales share one row
        _, loss = model(idx, targets, docs=docs, branches=branches)
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=ATOL, rtol=0)
    ours, theirs = grads(model), grads(hf, lambda k: families.module_key(k, model.cfg))
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=ATOL, rtol=0, msg=k)


def test_flex_attention_rows_give_the_same_loss_in_a_window(pair):
    """FlexTree (train.py --tree-kernel flex) under the sliding window: the loss of TreeAttention's rows (its
    gradients need a GPU: FlexAttention has no backward pass on a CPU)."""
    kind, _, folder = pair
    model = from_pretrained(folder)
    idx, targets, docs, branches, _ = data.layout(examples(), 0, 512, share=True, pack=True)
    with torch.no_grad():
        gather = model(idx, targets, docs=docs, branches=branches)[1]
        flex = model(idx, targets, docs=docs, branches=branches, tree_kernel="flex")[1]
    torch.testing.assert_close(flex, gather, atol=1e-5, rtol=0)


def test_cached_decode_with_a_shared_header_equals_the_full_forward_past_the_window(pair):
    """A header prefilled once, 3 left-padded questions after it, 6 decode steps: every step's logits equal a
    full forward over header + question + tokens so far (the window counted in positions, not cache slots)."""
    kind, _, folder = pair
    model = from_pretrained(folder)
    g = torch.Generator().manual_seed(7)
    header = torch.randint(3, 99, (1, 4), generator=g)
    ids, mask = left_padded_batch([4, 7, 2], pad_id=0)
    new = torch.randint(3, 99, (3, 6), generator=g)
    questions = [ids[b, mask[b].bool()].tolist() for b in range(3)]
    with torch.no_grad():
        shared = KVCache(model.cfg, 1, 4)
        model.prefill(header, shared)
        for static in (False, True):
            cache = KVCache(model.cfg, 3, ids.shape[1] + 6, static=static, shared=shared)
            model.prefill(ids, cache, mask)
            for t in range(6):
                step = model.decode_step(new[:, t:t + 1], cache)
                seqs = [header[0].tolist() + questions[b] + new[b, :t + 1].tolist() for b in range(3)]
                T = max(map(len, seqs))
                full = model(torch.tensor([[0] * (T - len(s)) + s for s in seqs]),
                             attention_mask=torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs]))[0][:, -1]
                torch.testing.assert_close(step[:, 0], full, atol=1e-5, rtol=0)


def test_what_scotd_saves_loads_in_transformers_as_the_same_family(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    kind, hf, folder = pair
    saved = save_pretrained(from_pretrained(folder), tmp_path / "m", tokenizer_from=folder)
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == json.loads((folder / "config.json").read_text())["model_type"]
    back = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager").eval()
    ids = torch.randint(3, 99, (1, 15), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(hf_logits(back, ids), hf_logits(hf, ids), atol=1e-6, rtol=0)


def downloaded(config):
    """A config.json as the hub's files have it: `rope_scaling` and `rope_theta` (and Gemma's
    rope_local_base_freq) instead of transformers 5's `rope_parameters`."""
    params = config.pop("rope_parameters")
    if "full_attention" in params:
        config["rope_theta"] = params["full_attention"]["rope_theta"]
        config["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        scaling = {k: v for k, v in params["full_attention"].items() if k != "rope_theta"}
    else:
        config["rope_theta"] = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    config["rope_scaling"] = None if scaling == {"rope_type": "default"} else scaling
    return config


def test_rope_scaling_and_rope_parameters_read_the_same(pair):
    kind, _, folder = pair
    config = json.loads((folder / "config.json").read_text())
    assert families.Config.from_dict(downloaded(config)).ropes == families.Config.from_dict(
        json.loads((folder / "config.json").read_text())).ropes


@pytest.mark.parametrize("field,value,message", [
    ("attn_logit_softcapping", 50.0, "attn_logit_softcapping 50.0 is not supported"),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "rope_type 'dynamic' is not supported"),
    ("model_type", "gemma4_text", "unsupported model_type 'gemma4_text'"),
    ("hidden_act", "swish_glu", "hidden_act 'swish_glu' is not supported"),
])
def test_what_scotd_does_not_implement_is_refused_by_name(tmp_path, field, value, message):
    hf = family_config("qwen3").to_dict() | {field: value}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("kind,change,message", [
    ("gemma3", {"layer_types": ["sliding_attention"] * 4},
     r"layer_types holds 4 entries; it must hold a list of one entry a layer \(num_hidden_layers = 3\)"),
    ("gemma3", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     r'layer_types\[1\] holds "chunked_attention"; it must hold one of "full_attention", "sliding_attention"'),
    ("qwen2-sliding", {"layer_types": "sliding_attention"}, r'layer_types holds "sliding_attention"; it must hold a list'),
    ("smollm3", {"no_rope_layers": [1, 0]}, r"no_rope_layers holds 2 entries; it must hold a list of one entry a layer"),
    ("smollm3", {"no_rope_layers": [1, 2, 1]}, r"no_rope_layers\[1\] holds 2; it must hold one of 0, 1"),
    ("smollm3", {"no_rope_layers": [1, 0.5, 1]}, r"no_rope_layers\[1\] holds 0.5; it must hold one of 0, 1"),
    ("gemma3", {"layer_types": None, "sliding_window_pattern": 0},
     r"sliding_window_pattern holds 0; it must hold a positive integer"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": -1.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     r"rope_parameters.full_attention.rope_theta holds -1.0; it must hold a positive number"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "local": {}}},
     r"rope_parameters.local is not a layer type"),
    ("llama-llama3", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": "8"}},
     r'rope_parameters.factor holds "8"; it must hold a positive number or null'),
    ("qwen3", {"num_hidden_layers": "3"}, r'num_hidden_layers holds "3"; it must hold a positive integer'),
    ("qwen3", {"num_key_value_heads": 3}, r"num_key_value_heads holds 3; it must divide num_attention_heads \(4\)"),
    ("qwen3", {"rms_norm_eps": -1e-6}, r"rms_norm_eps holds -1e-06; it must hold a positive number"),
    ("mistral", {"sliding_window": 2.5}, r"sliding_window holds 2.5; it must hold a positive integer or null"),
    ("qwen3", {"tie_word_embeddings": "yes"}, r'tie_word_embeddings holds "yes"; it must hold true or false'),
])
def test_a_config_field_of_the_wrong_type_range_or_length_is_refused_naming_it(tmp_path, kind, change, message):
    """Every field the families table reads is checked where any config is read (here the student's folder; a
    teacher, --init and a hub id go through the same checkpoint.read_config): a per-layer list of the wrong length
    trained and exited 0 before; transformers refuses it (the first case, checked)."""
    hf = family_config(kind).to_dict() | change
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'config.json'}: {message}"):
        from_pretrained(tmp_path)
    if kind == "gemma3" and "layer_types" in change and len(change["layer_types"] or []) == 4:
        import transformers as t
        with pytest.raises(Exception, match="must be equal to the number of `layer_types`"):
            t.Gemma3TextConfig(**{k: v for k, v in hf.items() if k in BASE or k == "layer_types"})


# -----------------------------------------------------------------------------
# A model named by its hub id, from the local Hugging Face cache (no network)


def fabricated_cache(root, folder, hub_id="acme/tiny", commit="0123abcd"):
    """The layout huggingface_hub writes: models--OWNER--NAME/{blobs/<hash>, snapshots/<commit>/<file> -> blob,
    refs/main}."""
    repo = root / f"models--{hub_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for i, f in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(f.read_bytes())
        (repo / "snapshots" / commit / f.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_a_hub_id_is_resolved_from_the_local_cache(tmp_path, monkeypatch, capsys):
    import evaluate
    import teacher
    import train

    folder = tiny_student(tmp_path / "m")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = fabricated_cache(tmp_path / "hf" / "hub", folder)
    assert train.get_args(["--init", "acme/tiny", "--out", str(tmp_path / "o")]).init == str(snapshot)
    args = evaluate.get_args(["--checkpoint", "acme/tiny"])
    assert args.checkpoint == snapshot and args.out == "runs/eval-acme--tiny"  # not into the cache
    assert teacher.get_args(["--teacher", "acme/tiny@0123abcd", "--out", str(tmp_path / "c.jsonl")]).teacher == str(snapshot)
    ids = torch.randint(3, 99, (1, 9))
    torch.testing.assert_close(from_pretrained(snapshot)(ids)[0], from_pretrained(folder)(ids)[0], atol=0, rtol=0)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins over HF_HOME
    with pytest.raises(SystemExit) as e:
        train.get_args(["--init", "acme/tiny", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --init: acme/tiny is not a folder here, nor in the Hugging Face cache" in err
    assert "download it with `hf download acme/tiny`" in err and str(tmp_path / "elsewhere") in err
