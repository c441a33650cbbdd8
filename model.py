"""The student: one decoder-only transformer that is numerically the same model as HF's OPT and Llama.

SCoTD (Li et al. 2023, §3) fine-tunes small decoders -- OPT-125m/350m/1.3b in the paper -- on teacher
rationales and then samples many chains from them at test time. This file is that student:

- `Config`: a typed view of an HF `config.json` (`model_type` "opt", "llama" or "qwen2").
- `Transformer`: embeddings -> blocks -> norm -> lm_head, with module names that mirror the HF
  checkpoints (after dropping the `model.` / `model.decoder.` prefix; OPT's `out_proj` is read as
  `o_proj`), so loading is a strict `load_state_dict` and nothing is transposed behind the reader's back.
  Three entry points: `forward(idx, targets)` over whole rows (training, scoring), `prefill(idx, cache)`
  and `decode_step(idx, cache)` for sampling.
    OPT:   learned positions (offset 2), LayerNorm, ReLU MLP, biases, pre-LN or post-LN (350m layout,
           with project_in/project_out), tied lm_head.
    Llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, tied or untied lm_head.
    Qwen2: Llama's layout with biases on q/k/v (the Qwen2.5 teachers).
- `KVCache`: a static, preallocated cache written in place, for prefill + one-token decode of
  left-padded batches, that can repeat one prompt's rows N times (N chains for self-consistency), and
  whose rows can share one prefix cache they all attend to without a copy (a few-shot header).

The attention kernels for packed, shared-prefix and shared-header rows live in attention.py. Loading and
saving HF-layout folders, the tokenizer and the default student live in checkpoint.py.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import Dense, FlexTree, SharedPrefix, TreeAttention

# -----------------------------------------------------------------------------
# Config

MODEL_TYPES = ("opt", "llama", "qwen2")


@dataclass
class Config:
    model_type: str  # "opt" | "llama" | "qwen2" (Llama's layout with q/k/v biases)
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
    qkv_bias: bool = False  # q/k/v biases only (Qwen2)
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
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}: scotd supports {', '.join(MODEL_TYPES)}")
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
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
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
        if kind in ("llama", "qwen2"):
            if kind == "qwen2" and (hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or [])):
                raise ValueError(f"{path}: sliding-window attention is not supported")
            rope_scaling = hf.get("rope_scaling") or {}
            if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
                raise ValueError(f"{path}: rope_scaling {rope_scaling} is not supported (only default RoPE)")
            if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
                raise ValueError(f"{path}: attention_bias != mlp_bias is not supported")
            rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
            return cls(
                model_type=kind, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
                num_key_value_heads=hf.get("num_key_value_heads") or 0, head_dim=hf.get("head_dim") or 0,
                intermediate_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
                hidden_act=hf.get("hidden_act", "silu"), tie_word_embeddings=hf.get("tie_word_embeddings", False),
                bias=hf.get("attention_bias", False), qkv_bias=kind == "qwen2", rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope_theta), hf=hf)
        raise ValueError(f"{path}: unsupported model_type {kind!r}: scotd supports {', '.join(MODEL_TYPES)}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Static cache: K/V for every layer preallocated to `max_seq_len` slots and written in place.

    Rows of a batch share slot indices (left padding keeps them aligned); `valid[b, s]` says whether
    slot s of row b holds a real token, so padding is masked out and positions skip it. A prefill writes
    its T tokens into slots [length, length + T) and attends to the filled slots. A one-token decode step
    writes at `slot`, a device tensor, with index_copy_, and takes positions from `pos`. With
    `static=True` (gpt-fast; what sample.py sets for a compiled step) it attends over all `max_seq_len`
    slots under the validity mask, so its shapes never change and the step can be captured once (CUDA
    graphs); unwritten slots are then zeros, masked out, adding exactly nothing. Eager steps attend over
    the filled slots only: the same tokens, and 3-4 % faster on CPU, where attention work is not free.

    `shared`: a one-row cache (a few-shot header, prefilled once) that every row continues from. Its K/V
    are attended to by all rows but stored once, not copied per row (see `shared_prefix_attention`);
    this cache's slots hold only what follows it, and positions start at its length.

    K and V are one tensor per layer, not one (L, ...) tensor: a compiled step that writes into a slice of one
    big input rewrites the whole of it (every layer's cache) for each layer's write -- on an H100, 256 rows
    over 512 slots, 94 ms a step instead of a few (bench/README.md, "The GPU rows").
    """

    def __init__(self, cfg, batch_size, max_seq_len, device=None, dtype=torch.float32, static=False, shared=None):
        shape = (batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        alloc = torch.zeros if static else torch.empty  # eager steps never read a slot before writing it
        self.k = [alloc(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]  # L x (B, n_kv, S, hd)
        self.v = [alloc(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)  # (B, S)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the next slot, on the device (== length)
        self.length = 0  # slots filled so far, the same for every row
        self.static = static  # decode steps attend over all slots (fixed shapes) rather than the filled ones
        assert shared is None or (shared.batch_size == 1 and shared.shared is None), "shared: a one-row cache"
        self.shared = shared  # the prefix every row continues from (all real tokens), or None
        self.offset = shared.length if shared is not None else 0  # positions of this cache's tokens start here
        self.pos = torch.full((batch_size,), self.offset, dtype=torch.long, device=device)  # (B,) each row's next position
        self._mark_static()

    def _mark_static(self):
        """A static cache on CUDA: its tensors keep their addresses, so a CUDA graph of the decode step (sample.py,
        mode="reduce-overhead") may write into them in place instead of being skipped for mutating its inputs."""
        if self.static and self.valid.is_cuda:
            for t in (*self.k, *self.v, self.valid, self.slot, self.pos):
                torch._dynamo.mark_static_address(t)

    @property
    def batch_size(self):
        return self.valid.shape[0]

    @property
    def max_seq_len(self):
        return self.valid.shape[1]

    def write(self, layer, k, v):
        """Store this step's K/V (B, n_kv, T, hd) for `layer`; return the K/V to attend over."""
        K, V = self.k[layer], self.v[layer]
        if k.shape[2] == 1:  # decode
            K.index_copy_(2, self.slot, k.to(K.dtype))  # autocast may compute K/V in 16 bits
            V.index_copy_(2, self.slot, v.to(V.dtype))
            n = self.attended()
            return K[:, :, :n], V[:, :, :n]  # (B, n_kv, S, hd)
        end = self.length + k.shape[2]
        K[:, :, self.length:end] = k
        V[:, :, self.length:end] = v
        return K[:, :, :end], V[:, :, :end]

    def attention(self, mask):
        """How a prefill or decode step over this cache attends (attention.py), under mask (B, 1, T, S)."""
        return Dense(mask) if self.shared is None else SharedPrefix(mask, self)

    def shared_kv(self, layer):
        """The shared prefix's K/V for `layer`: (n_kv, P, hd) each."""
        P = self.shared.length
        return self.shared.k[layer][0, :, :P], self.shared.v[layer][0, :, :P]

    def attended(self):
        """Slots a decode step attends over: all of them when static, else the filled ones and the new one."""
        return self.max_seq_len if self.static else self.length + 1

    def _view(self, k, v, valid, pos):
        new = object.__new__(KVCache)
        new.k, new.v, new.valid, new.pos, new.slot, new.length, new.static = k, v, valid, pos, self.slot, self.length, self.static
        new.shared, new.offset = self.shared, self.offset
        new._mark_static()
        return new

    def repeat_rows(self, n):
        """Each row repeated n times in place order (row b -> rows b*n .. b*n+n-1): one prefill, n chains.
        Only the filled slots are copied (the rest are zeroed if static); a shared prefix is not copied.
        n = 1 (greedy) returns this cache itself: nothing to repeat."""
        if n == 1:
            return self
        B, n_kv, S, hd = self.k[0].shape
        filled, empty = slice(0, self.length), slice(self.length, S)

        def repeated(t):
            new = t.new_empty(B * n, n_kv, S, hd)
            new[:, :, filled] = t[:, :, filled].repeat_interleave(n, 0)
            if self.static:
                new[:, :, empty] = 0
            return new
        return self._view([repeated(t) for t in self.k], [repeated(t) for t in self.v],
                          self.valid.repeat_interleave(n, 0), self.pos.repeat_interleave(n, 0))

    def select_rows(self, keep):
        """Keep only the rows `keep` (ascending), e.g. drop finished chains from the running batch. The
        kept rows move to the front in place, filled slots only (through a temporary of one layer's moved
        rows), and this cache is consumed (use the returned one)."""
        m = len(keep)
        moved = [dst for dst, src in enumerate(keep) if dst != src]  # dst < src: a row moves to the front
        if moved:
            dst = torch.tensor(moved, device=self.valid.device)
            src = torch.tensor([keep[i] for i in moved], device=self.valid.device)
            filled = slice(0, self.length)
            for t in (*self.k, *self.v):  # one layer at a time: a temporary of the moved rows of one layer
                t[dst, :, filled] = t[src, :, filled]
            self.valid[dst] = self.valid[src]
            self.pos[dst] = self.pos[src]
        return self._view([t[:m] for t in self.k], [t[:m] for t in self.v], self.valid[:m], self.pos[:m])


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


def rope_table(max_positions, head_dim, theta, device):
    """cos and sin of the rotary angles of every position, each (max_positions, head_dim), in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(max_positions, device=device, dtype=torch.float32)[:, None] * inv_freq  # (P, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (P, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """HF Llama convention: the two halves of each head are the (real, imaginary) parts."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Self-attention: project, rotate (Llama), write K/V to the cache (if any), attend (attention.py), project.
    `attn` is how the tokens attend: attention.Dense, SharedPrefix or TreeAttention, built once a forward pass."""

    def __init__(self, cfg):
        super().__init__()
        n_head, n_kv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.head_dim = hd
        self.q_proj = nn.Linear(d, n_head * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, n_kv * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, n_kv * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(n_head * hd, d, bias=cfg.bias)  # OPT's checkpoints call it out_proj (checkpoint.py)

    def forward(self, x, rope, attn, cache, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # write this step's K/V into its slots, then attend over the cache
            k, v = cache.write(layer, k, v)  # (B, n_kv, S, hd)
        return self.o_proj(attn.attend(q, k, v, layer).reshape(B, T, -1))


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

    def forward(self, x, rope, attn, cache, layer):
        if self.pre_ln:  # 125m, 1.3b, ...
            x = x + self.self_attn(self.self_attn_layer_norm(x), rope, attn, cache, layer)
            x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        else:  # post-LN: 350m
            x = self.self_attn_layer_norm(x + self.self_attn(x, rope, attn, cache, layer))
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

    def forward(self, x, rope, attn, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), rope, attn, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))



# -----------------------------------------------------------------------------
# The model

def causal_mask(key_valid, start, T):
    """(B, 1, T, S) bool: query start+i sees key j if j <= start+i and slot j is real.

    Each query also sees itself, so a padding row never has an all-False row (sdpa would give NaN).
    """
    S = key_valid.shape[1]
    q_slot = torch.arange(start, start + T, device=key_valid.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=key_valid.device)[None, :]  # (1, S)
    mask = (k_slot <= q_slot) & key_valid[:, None, :]  # (B, T, S)
    mask |= k_slot == q_slot
    return mask[:, None]


CE_CHUNK_ELEMENTS = 2 ** 25  # logits a chunk of the head + cross-entropy holds at once (128 MiB in fp32)


def linear_cross_entropy(x, weight, labels):
    """Mean cross-entropy of the logits x @ weight.T (N, V) against labels (N,), in fp32, computed in chunks of
    rows so that the whole (N, V) logits never exist at once (for N = 2,048 targets and SmolLM2's 49k vocabulary
    they would be 400 MB in fp32, twice over with their gradient). Equal to F.cross_entropy(F.linear(x,
    weight).float(), labels) with its gradients (tested to 1e-5); no rows: a zero loss with zero gradients."""
    if x.shape[0] == 0:  # no target at all (a rank's empty share of a batch)
        return (x.sum() * weight.sum()).float() * 0
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLinearCE.apply(x, weight, labels)
    return sum(_chunk_loss(x[s], weight, labels[s], grad=False)[0] for s in _chunks(x.shape[0], weight.shape[0])) / x.shape[0]


def _chunks(n, vocab):
    rows = max(1, CE_CHUNK_ELEMENTS // vocab)
    return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]


def _chunk_loss(x, weight, labels, grad=True):
    """-> (the chunk's summed loss, and with grad its logits' gradient of that sum: softmax - one-hot), fp32."""
    logits = F.linear(x, weight).float()
    lse = logits.logsumexp(-1)
    loss = (lse - logits.gather(1, labels[:, None])[:, 0]).sum()
    if not grad:
        return loss, None
    grad = (logits - lse[:, None]).exp_()
    grad[torch.arange(len(labels), device=labels.device), labels] -= 1
    return loss, grad


class _ChunkedLinearCE(torch.autograd.Function):
    """The forward pass computes the gradients too, chunk by chunk (each chunk's logits are freed once its
    gradients wrt x and weight are taken); the backward pass only scales them by grad_out / N."""

    @staticmethod
    def forward(ctx, x, weight, labels):
        loss, grad_x = x.new_zeros((), dtype=torch.float32), torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        fp32 = x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
        for s in _chunks(x.shape[0], weight.shape[0]):
            chunk_loss, grad = _chunk_loss(x[s], weight, labels[s])
            loss += chunk_loss
            if fp32:  # the products written in place, the sum over chunks inside the GEMM
                torch.mm(grad, weight, out=grad_x[s])
                grad_w.addmm_(grad.T, x[s])
            else:  # under autocast: each product in the autocast precision, as autograd's would be; summed in fp32
                grad_x[s] = grad.to(x.dtype) @ weight.to(x.dtype)
                grad_w += grad.T @ x[s]
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ctx.n = x.shape[0]
        return loss / x.shape[0]

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return grad_x * scale.to(grad_x.dtype), grad_w * scale.to(grad_w.dtype), None


OPT_POSITION_OFFSET = 2  # OPT's learned position table has 2 extra rows in front (a fairseq legacy)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.source_folder = None  # set by from_pretrained; save_pretrained copies tokenizer files from it
        self.rope_cache = None  # (cos, sin) of every position, built on first use on the model's device
        self.tree_kernel = "gather"  # packed / shared-prefix rows: attention.TreeAttention ("gather") or FlexTree ("flex")
        self.compiled_step = None  # sample.decode_step's torch.compile of step_tensors, made once
        self.train_blocks = None  # compile_blocks(): the blocks compiled, run by forward() in training mode
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

    # Three entry points: forward (whole rows: training, scoring), prefill and decode_step (a KVCache).

    def forward(self, idx, targets=None, attention_mask=None, docs=None, branches=None, target_idx=None):
        """idx (B, T) token ids -> (logits (B, T, V), None), or with targets (None, the mean cross-entropy over
        the target positions).

        targets (B, T): the token each position should predict (already shifted), -100 = no loss; target_idx
        (N,): optionally, the flat indices of its positions that are not -100 (see _head).
        attention_mask (B, T): 1 for real tokens, 0 for (left) padding; None: no padding (plain causal).
        docs (B, T): group ids of packed rows: positions restart and attention stays within each group.
        branches (B, T): with docs, shared-prefix rows (data.layout): 0 = a group's prefix, k = its k-th
        branch, which sees the prefix and itself only; its positions continue from the prefix's.
        """
        B, T = idx.shape
        if docs is not None:
            tree = (FlexTree if self.tree_kernel == "flex" else TreeAttention)(docs, branches)
            return self._head(self._hidden(idx, tree.positions, tree), targets, target_idx)
        if attention_mask is None:  # training batches: causal attention, no mask, no host sync
            positions = torch.arange(T, device=idx.device).expand(B, T)
            return self._head(self._hidden(idx, positions, Dense()), targets, target_idx)
        valid = attention_mask.bool()
        # a token's position counts only the real tokens before it in its row, so left padding is harmless
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        attn = Dense() if valid.all() else Dense(causal_mask(valid, 0, T))
        return self._head(self._hidden(idx, positions, attn), targets, target_idx)

    def prefill(self, idx, cache, attention_mask=None, last_only=True):
        """Write idx (B, T) into the cache's next T slots, attending to everything before -> the logits of
        each row's last position (B, 1, V), or of every position (B, T, V) with last_only=False. A prefill
        needs only the last: the head (49k x d for SmolLM2) over every prompt position would be a fifth of
        its FLOPs. attention_mask (B, T): 0 for left padding, which is masked and skipped by positions."""
        B, T = idx.shape
        start = cache.length
        assert start + T <= cache.max_seq_len, f"KV cache full: {start} + {T} > {cache.max_seq_len} slots"
        cache.valid[:, start:start + T] = True if attention_mask is None else attention_mask.bool()
        key_valid = cache.valid[:, :start + T]  # (B, S)
        positions = cache.offset + (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, start:]  # (B, T)
        x = self._hidden(idx, positions, cache.attention(causal_mask(key_valid, start, T)), cache)
        cache.length += T  # the decode step's counters continue from here
        cache.slot.fill_(cache.length)
        cache.pos.copy_(cache.offset + key_valid.sum(1))
        return self.lm_head(x[:, -1:] if last_only else x)

    def decode_step(self, idx, cache, step=None):
        """One new token per row, idx (B, 1), every row real -> logits (B, 1, V). The work on the device is
        `step_tensors` (or `step`, its compiled version: sample.decode_step); the host's count of filled slots
        is advanced here, outside it. (A Python int changed inside a compiled function becomes an input of
        the graph, and CUDA graphs record a new graph for every value an input int takes: one a step.)"""
        logits = (step or self.step_tensors)(idx, cache)
        cache.length += 1
        return logits

    def step_tensors(self, idx, cache):
        """decode_step's device work: static shapes (see KVCache) and tensors alone, so it compiles once and
        is captured as one CUDA graph."""
        cache.valid.index_fill_(1, cache.slot, True)
        mask = cache.valid[:, None, None, :cache.attended()]  # (B, 1, 1, S): later slots are not valid yet
        x = self._hidden(idx, cache.pos[:, None], cache.attention(mask), cache)
        cache.pos += 1
        cache.slot += 1
        return self.lm_head(x)

    def _rope(self, positions):
        """cos/sin for integer positions (B, T) -> (B, 1, T, head_dim), looked up in a table built once."""
        if self.rope_cache is None or self.rope_cache[0].device != positions.device:
            self.rope_cache = rope_table(self.cfg.max_position_embeddings, self.cfg.head_dim, self.cfg.rope_theta,
                                         positions.device)
        cos, sin = self.rope_cache
        return cos[positions][:, None], sin[positions][:, None]

    def compile_blocks(self, dynamic=True):
        """torch.compile each block for training (torchtitan's per-block compile). The blocks share their
        code, so one compiled graph serves all of them: SmolLM2-135M's first 4 steps (2 lengths) took 39 s on
        a CPU, against 205 s with the whole model compiled (bench/compile_time.py). dynamic=True: batches come
        in many lengths, and the default (None: a graph for the first shape, then a dynamic one at the second)
        compiled twice for the same steady state (6 steps, 4 lengths, on a CPU: 42.4 s -> 36.7 s, the
        recompile's 11.8 s gone, step times equal; `bench/compile_time.py --how blocks-static,blocks`). Only
        forward() in training mode runs them; checkpoints, evaluation and decoding see the plain modules."""
        self.train_blocks = [torch.compile(block, dynamic=dynamic) for block in self.layers]  # a list: not submodules

    def _hidden(self, idx, positions, attn, cache=None):
        """Embeddings -> blocks -> final norm: (B, T, d), each token at `positions` attending as `attn` says."""
        x = self.embed_tokens(idx)
        rope = None
        if self.cfg.model_type == "opt":
            if hasattr(self, "project_in"):
                x = self.project_in(x)
            x = x + self.embed_positions(positions + OPT_POSITION_OFFSET)
        else:
            rope = self._rope(positions)
        blocks = self.train_blocks if self.training and self.train_blocks and cache is None else self.layers
        for i, layer in enumerate(blocks):
            x = layer(x, rope, attn, cache, i)
        if self.cfg.model_type != "opt":
            return self.norm(x)
        if hasattr(self, "final_layer_norm"):
            x = self.final_layer_norm(x)
        return self.project_out(x) if hasattr(self, "project_out") else x

    def _head(self, x, targets, target_idx=None):
        """The logits (B, T, V); or with targets (None, the mean cross-entropy over the target positions). The
        head (49k x d for SmolLM2) runs only where there is a target (the query has none), in row chunks
        (linear_cross_entropy: never the whole (N, V) logits). target_idx: the flat indices of the positions
        whose target is not -100, computed on the host by the caller (no device->host sync); else found here."""
        if targets is None:
            return self.lm_head(x), None
        if target_idx is None:
            target_idx = (targets.flatten() != -100).nonzero()[:, 0]
        hidden = x.flatten(0, 1).index_select(0, target_idx)  # (N_targets, d)
        return None, linear_cross_entropy(hidden, self.lm_head.weight, targets.flatten().index_select(0, target_idx))

    def num_params(self):
        """Parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())
