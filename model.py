"""The student: one decoder-only transformer, numerically the same model as transformers' OPT, Llama, Mistral,
Qwen2, Qwen3, SmolLM3 and Gemma 3 (text).

SCoTD (Li et al. 2023, §3) fine-tunes small decoders -- OPT-125m/350m/1.3b in the paper -- on teacher
rationales and then samples many chains from them at test time. This file is that student, written once: the
families differ only by the knobs of `families.Config` (read from their config.json by families.py), some
model-wide -- the norm (RMSNorm, Gemma's x * (1 + w), LayerNorm) and where it sits (before; after, OPT-350m;
before and after, Gemma 3), q/k norm, a gated or plain MLP, an embedding scale, the attention scale, logit
soft-capping, learned positions -- and two per layer: its RoPE (a base and a scaling kind, or none) and its
sliding window (or none).

- `Transformer`: embeddings -> blocks -> norm -> lm_head, with module names that mirror the HF checkpoints
  (after dropping the `model.` prefix; families.py renames OPT's), so loading is a strict `load_state_dict`.
  Three entry points: `forward(idx, targets)` over whole rows (training, scoring), `prefill(idx, cache)` and
  `decode_step(idx, cache)` for sampling from a `sample.KVCache`.
- How tokens attend (dense, shared header, packed and shared-prefix rows, each with its sliding-window variant)
  lives in attention.py; the chunked head + cross-entropy in losses.py; loading and saving HF-layout folders in
  checkpoint.py.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import Dense, FlexTree, TreeAttention
from families import Config, yarn_attention_factor  # noqa: F401 -- Config: model.Config, as callers know it
import losses

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
       "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
OPT_POSITION_OFFSET = 2  # OPT's learned position table has 2 extra rows in front (a fairseq legacy)


# -----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """Llama's RMSNorm, weight * x_normed; with one_plus, Gemma's (x_normed * (1 + weight)), its weight stored as
    the offset from 1 and the product taken in fp32."""

    def __init__(self, dim, eps, one_plus=False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if one_plus else torch.ones(dim))
        self.eps, self.one_plus = eps, one_plus

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.one_plus:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def norm(cfg, dim):
    return nn.LayerNorm(dim) if cfg.norm == "layer" else RMSNorm(dim, cfg.rms_norm_eps, one_plus=cfg.norm == "rms1p")


def inverse_frequencies(rope, head_dim, device=None):
    """The rotary frequencies of one Rope (as transformers computes each rope_type) -> (hd/2,) fp32."""
    inv = 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim)
    return SCALED[rope.kind](inv, rope, head_dim) if rope.kind in SCALED else inv


def linear_scaled(inv, rope, head_dim):
    return inv / rope.factor


def llama3_scaled(inv, rope, head_dim):
    """Wavelengths past the pre-training context slowed by `factor`, a smooth band between."""
    low, high = rope.original_max_positions / rope.low_freq_factor, rope.original_max_positions / rope.high_freq_factor
    wavelen = 2 * torch.pi / inv
    scaled = torch.where(wavelen > low, inv / rope.factor, inv)
    band = rope.high_freq_factor - rope.low_freq_factor
    smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / band
    medium = ~(wavelen < high) * ~(wavelen > low)
    return torch.where(medium, (1 - smooth) * scaled / rope.factor + smooth * scaled, scaled)


def yarn_scaled(inv, rope, head_dim):
    """A ramp between interpolated (slow) and extrapolated (fast) frequencies."""
    def dim_of(rotations):
        return head_dim * math.log(rope.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))
    lo, hi = dim_of(rope.beta_fast), dim_of(rope.beta_slow)
    lo, hi = (math.floor(lo), math.ceil(hi)) if rope.truncate else (lo, hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    dims = torch.arange(head_dim // 2, dtype=torch.float32, device=inv.device)
    ramp = (dims - lo) / (hi - lo if hi != lo else 0.001)
    extrapolate = 1 - ramp.clamp(0, 1)
    freqs = rope.theta ** (torch.arange(0, head_dim, 2, device=inv.device).float() / head_dim)
    return (1 / (rope.factor * freqs)) * (1 - extrapolate) + (1 / freqs) * extrapolate


SCALED = {"linear": linear_scaled, "llama3": llama3_scaled, "yarn": yarn_scaled}  # rope_type -> its scaling


def rope_table(max_positions, head_dim, rope, device):
    """cos and sin of the rotary angles of every position, each (max_positions, head_dim), in fp32 (YaRN: scaled)."""
    positions = torch.arange(max_positions, device=device, dtype=torch.float32)
    angles = positions[:, None] * inverse_frequencies(rope, head_dim, device)
    angles = torch.cat((angles, angles), dim=-1)  # (P, hd)
    scale = yarn_attention_factor(rope) if rope.kind == "yarn" else 1.0
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x, cos, sin):
    """HF Llama convention: the two halves of each head are the (real, imaginary) parts."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Self-attention: project, norm each head of q and k (cfg.qk_norm), rotate (if the layer has RoPE), write K/V
    to the cache (if any), attend (attention.py: `attn` is how the tokens attend, built once a forward pass)."""

    def __init__(self, cfg):
        super().__init__()
        n_head, n_kv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.head_dim, self.scale = hd, cfg.attn_scale or None  # None: SDPA's head_dim ** -0.5
        self.q_proj = nn.Linear(d, n_head * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, n_kv * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, n_kv * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(n_head * hd, d, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = norm(cfg, hd), norm(cfg, hd)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, rope, attn, cache, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hd), (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # write this step's K/V into its slots, then attend over the cache
            k, v = cache.write(layer, k, v)  # (B, n_kv, S, hd)
        return self.o_proj(attn.attend(q, k, v, layer, self.scale).reshape(B, T, -1))


class MLP(nn.Module):
    """Gated (SwiGLU, GeGLU): down(act(gate(x)) * up(x)); plain (OPT's fc1, fc2): down(act(up(x)))."""

    def __init__(self, cfg):
        super().__init__()
        self.act = ACT[cfg.hidden_act]
        if cfg.mlp == "gated":
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.bias)
        self.gated = cfg.mlp == "gated"

    def forward(self, x):
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(h)


class Block(nn.Module):
    """One layer. Norms: "pre" (x + f(norm(x))), "post" (OPT-350m: norm(x + f(x))), or "sandwich" (Gemma 3:
    x + norm(f(norm(x))), where post_attention_layernorm is the attention output's norm)."""

    def __init__(self, cfg):
        super().__init__()
        d, self.place = cfg.hidden_size, cfg.norm_place
        self.input_layernorm, self.self_attn = norm(cfg, d), Attention(cfg)
        self.post_attention_layernorm, self.mlp = norm(cfg, d), MLP(cfg)
        if self.place == "sandwich":
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(cfg, d), norm(cfg, d)

    def forward(self, x, rope, attn, cache, layer):
        if self.place == "post":
            x = self.input_layernorm(x + self.self_attn(x, rope, attn, cache, layer))
            return self.post_attention_layernorm(x + self.mlp(x))
        h = self.self_attn(self.input_layernorm(x), rope, attn, cache, layer)
        if self.place == "sandwich":
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
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


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.rope_cache = {}  # Rope -> (cos, sin) of every position, built on first use on the model's device
        self.train_blocks = None  # compile_blocks(): the blocks compiled, run by forward() in training mode
        d, e = cfg.hidden_size, cfg.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, e)
        if cfg.learned_positions:
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings + OPT_POSITION_OFFSET, d)
        if e != d:  # OPT-350m: embeddings narrower than the blocks
            self.project_in, self.project_out = nn.Linear(e, d, bias=False), nn.Linear(d, e, bias=False)
        if cfg.final_norm:
            self.norm = norm(cfg, d)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.lm_head = nn.Linear(e, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # Three entry points: forward (whole rows: training, scoring), prefill and decode_step (a sample.KVCache).

    def forward(self, idx, targets=None, attention_mask=None, docs=None, branches=None, target_idx=None,
                tree_kernel="gather", teacher_view=None):
        """idx (B, T) token ids -> (logits (B, T, V), None), or with targets (None, the mean cross-entropy over
        the target positions), or with targets and a teacher_view at the target positions, in order --
        losses.TopKTargets (its top-k: train.py --kd), losses.Grader or losses.SampledTokens (on-policy) -- ({the
        loss's parts, detached, by name}, the loss to train on).

        targets (B, T): the token each position should predict (already shifted), -100 = no loss; target_idx
        (N,): optionally, the flat indices of its positions that are not -100 (see _head).
        attention_mask (B, T): 1 for real tokens, 0 for (left) padding; None: no padding (plain causal).
        docs (B, T): group ids of packed rows: positions restart and attention stays within each group.
        branches (B, T): with docs, shared-prefix rows (data.layout): 0 = a group's prefix, k = its k-th
        branch, which sees the prefix and itself only; its positions continue from the prefix's.
        tree_kernel: how packed and shared-prefix rows attend: "gather" (TreeAttention) or "flex" (FlexTree).
        """
        B, T = idx.shape
        if docs is not None:
            tree = (FlexTree if tree_kernel == "flex" else TreeAttention)(docs, branches)
            return self._head(self._hidden(idx, tree.positions, tree), targets, target_idx, teacher_view)
        if attention_mask is None:  # training batches: causal attention, no mask, no host sync
            positions = torch.arange(T, device=idx.device).expand(B, T)
            return self._head(self._hidden(idx, positions, Dense(None, positions)), targets, target_idx, teacher_view)
        valid = attention_mask.bool()
        # a token's position counts only the real tokens before it in its row, so left padding is harmless
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        attn = Dense(None if valid.all() else causal_mask(valid, 0, T), positions)
        return self._head(self._hidden(idx, positions, attn), targets, target_idx, teacher_view)

    def prefill(self, idx, cache, attention_mask=None, last_only=True):
        """Write idx (B, T) into the cache's next T slots, attending to everything before -> the logits of
        each row's last position (B, 1, V), or of every position (B, T, V) with last_only=False. A prefill
        needs only the last: the head (49k x d for SmolLM2) over every prompt position would be a fifth of
        its FLOPs. attention_mask (B, T): 0 for left padding, which is masked and skipped by positions."""
        x = self._prefill_hidden(idx, cache, attention_mask)
        return self._logits(x[:, -1:] if last_only else x)

    def _prefill_hidden(self, idx, cache, attention_mask=None):
        """prefill's work before the head: idx (B, T) written into the cache -> the final hidden states (B, T, d)."""
        B, T = idx.shape
        start = cache.length
        assert start + T <= cache.max_seq_len, f"KV cache full: {start} + {T} > {cache.max_seq_len} slots"
        cache.valid[:, start:start + T] = True if attention_mask is None else attention_mask.bool()
        key_valid = cache.valid[:, :start + T]  # (B, S)
        positions = cache.offset + (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, start:]  # (B, T)
        x = self._hidden(idx, positions, cache.attention(causal_mask(key_valid, start, T), positions), cache)
        cache.length += T  # the decode step's counters continue from here
        cache.slot.fill_(cache.length)
        cache.pos.copy_(cache.offset + key_valid.sum(1))
        return x

    def decode_step(self, idx, cache, step=None):
        """One new token per row, idx (B, 1), every row real -> logits (B, 1, V). The work on the device is
        `step_tensors` (or `step`, its compiled version: sample.compiled_decode_step); the host's count of filled
        slots is advanced here, outside it. (A Python int changed inside a compiled function becomes an input of
        the graph, and CUDA graphs record a new graph for every value an input int takes: one a step.)"""
        logits = (step or self.step_tensors)(idx, cache)
        cache.length += 1
        return logits

    def step_tensors(self, idx, cache):
        """decode_step's device work: static shapes (see sample.KVCache) and tensors alone, so it compiles once and
        is captured as one CUDA graph."""
        cache.valid.index_fill_(1, cache.slot, True)
        mask = cache.valid[:, None, None, :cache.attended()]  # (B, 1, 1, S): later slots are not valid yet
        positions = cache.pos[:, None].clone()
        x = self._hidden(idx, positions, cache.attention(mask, positions), cache)
        cache.pos += 1
        cache.slot += 1
        return self._logits(x)

    def _ropes(self, positions):
        """Each layer's RoPE as {Rope: cos/sin (B, 1, T, head_dim)} at integer positions (B, T), looked up in tables
        built once per distinct Rope."""
        out = {}
        for rope in dict.fromkeys(r for r in self.cfg.ropes if r is not None):
            if rope not in self.rope_cache or self.rope_cache[rope][0].device != positions.device:
                self.rope_cache[rope] = rope_table(self.cfg.max_position_embeddings, self.cfg.head_dim, rope,
                                                   positions.device)
            cos, sin = self.rope_cache[rope]
            out[rope] = cos[positions][:, None], sin[positions][:, None]
        return out

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
        """Embeddings -> blocks -> final norm: (B, T, d), each token at `positions` attending as `attn` says (a
        sliding-window layer: as attn.windowed(window) says)."""
        cfg = self.cfg
        x = self.embed_tokens(idx)
        if cfg.embed_scale != 1.0:  # Gemma: the scale rounded to the embeddings' dtype, as transformers does
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            x = self.project_in(x)
        if cfg.learned_positions:
            x = x + self.embed_positions(positions + OPT_POSITION_OFFSET)
        ropes = self._ropes(positions)
        attns = {None: attn} | {w: attn.windowed(w) for w in set(cfg.windows) if w is not None}
        blocks = self.train_blocks if self.training and self.train_blocks and cache is None else self.layers
        for i, layer in enumerate(blocks):
            x = layer(x, ropes.get(cfg.ropes[i]), attns[cfg.windows[i]], cache, i)
        if cfg.final_norm:
            x = self.norm(x)
        return self.project_out(x) if cfg.word_embed_proj_dim != cfg.hidden_size else x

    def _logits(self, x):
        """The head, soft-capped where the config says (cap * tanh(logits / cap))."""
        return losses.capped(self.lm_head(x), self.cfg.logit_softcap)

    def _head(self, x, targets, target_idx=None, teacher_view=None):
        """The logits (B, T, V); or with targets (None, the mean cross-entropy over the target positions). The
        head (49k x d for SmolLM2) runs only where there is a target (the query has none), in row chunks
        (losses.linear_cross_entropy: never the whole (N, V) logits). target_idx: the flat indices of the positions
        whose target is not -100, computed on the host by the caller (no device->host sync); else found here."""
        if targets is None:
            return self._logits(x), None
        if target_idx is None:
            target_idx = (targets.flatten() != -100).nonzero()[:, 0]
        hidden = x.flatten(0, 1).index_select(0, target_idx)  # (N_targets, d)
        labels = targets.flatten().index_select(0, target_idx)
        weight, cap = self.lm_head.weight, self.cfg.logit_softcap
        if teacher_view is not None:  # --kd, on-policy: the teacher's view has its loss (losses.py) -> (parts, loss)
            return teacher_view.loss(hidden, weight, labels, cap)
        if cap is not None:  # soft-capped logits: the plain loss (the chunked one has no cap)
            return None, F.cross_entropy(self._logits(hidden).float(), labels)
        return None, losses.linear_cross_entropy(hidden, weight, labels)

    @torch.no_grad()
    def hidden_at(self, idx, target_idx, cache=None):
        """The final hidden states (N, d) of right-padded causal rows idx (B, T) at the flat positions target_idx
        (N,): what a teacher's head reads to grade a student's tokens (train.py --on-policy). cache: an empty
        sample.KVCache of B rows and T slots whose shared header every row continues (read once, not once a row)."""
        B, T = idx.shape
        if cache is not None:
            return self._prefill_hidden(idx, cache).flatten(0, 1).index_select(0, target_idx)
        positions = torch.arange(T, device=idx.device).expand(B, T)
        return self._hidden(idx, positions, Dense(None, positions)).flatten(0, 1).index_select(0, target_idx)

    def num_params(self):
        """Parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

