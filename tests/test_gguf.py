"""convert_gguf.py on a qwen2 GGUF written here (no download): a tiny random Qwen2 with one Q8_0 tensor and a
byte-level BPE vocabulary, converted by us and loaded by transformers from the same file."""

import json

import pytest
import torch

from checkpoint import convert_gguf, from_pretrained, load_tokenizer
from convert_gguf import GGUF_TO_HF
from helpers import make_hf_model

TEXTS = ["Q: How many apples are 12 + 345?\nA: 357 apples.", "It's the beaver's lake, isn't it?  Yes!\n\n"]


def write_qwen2_gguf(path, hf, tokenizer_json):
    """The GGUF llama.cpp would write for this model: metadata, vocabulary, tensors under llama.cpp names."""
    import gguf

    cfg = hf.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(1e6)
    vocab = json.loads(tokenizer_json)["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]])
    w.add_eos_token_id(vocab["vocab"]["<|endoftext|>"])
    to_gguf = {}  # Qwen2's names: the norm before the MLP is llama.cpp's ffn_norm (Gemma 3's names come later)
    for gguf_name, hf_name in GGUF_TO_HF.items():
        to_gguf.setdefault(hf_name.replace("{ffn_norm}", "post_attention_layernorm"), gguf_name)
    for name, tensor in hf.state_dict().items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        template = name.replace(f".{layer}.", ".{}.", 1) if layer is not None else name
        gguf_name = to_gguf[template].format(layer)
        data = tensor.detach().float().numpy()
        if gguf_name == "blk.0.ffn_up.weight":  # one quantised tensor: rows of 32 values, one scale each
            w.add_tensor(gguf_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("qwen2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 20 + ["So the answer is (a) (b) (c) 0123456789"], vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    hf = make_hf_model("qwen2-tied", vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2)
    return write_qwen2_gguf(folder / "tiny-qwen2.gguf", hf, bpe.to_str()), hf


def test_qwen2_gguf_converts_to_what_transformers_loads(qwen2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, source = qwen2_gguf
    ours_folder = convert_gguf(path, tmp_path / "converted")
    config = json.loads((ours_folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"] and config["rope_theta"] == 1e6
    ours = from_pretrained(ours_folder)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = load_tokenizer(ours_folder)
    for text in TEXTS:  # the Qwen2 split: digits one by one, contractions, newlines
        assert tok.encode(text).ids == ref_tok(text, add_special_tokens=False)["input_ids"], text
    ids = torch.tensor([tok.encode(TEXTS[0]).ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], ref(ids).logits, atol=1e-4, rtol=0)
        # the F32 tensors are the source model's exactly; the Q8_0 one is within its quantisation step
        up = ours.layers[0].mlp.up_proj.weight
        src = source.model.layers[0].mlp.up_proj.weight
        assert 0 < (up - src).abs().max() <= src.abs().max() / 127
        assert torch.equal(ours.layers[1].self_attn.q_proj.bias, source.model.layers[1].self_attn.q_proj.bias)
