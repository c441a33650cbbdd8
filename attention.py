"""How a token attends: the attention kernels model.Attention calls, one interface for the three kinds of rows.

Each kind is an object built once per forward pass (from the batch's mask or layout) and called by every
layer with that layer's projected q (B, nh, T, hd) and k, v (B, n_kv, S, hd) -> y (B, T, nh, hd) (and the
attention scale: None, head_dim ** -0.5; Gemma 3's is query_pre_attn_scalar ** -0.5). `windowed(w)` gives the same
kind for a sliding-window layer: a query at position p sees only the keys at positions above p - w (as
transformers' sliding_window_overlay), by position, so left padding and a shared header do not move the window.

- `Dense`: PyTorch's scaled_dot_product_attention, causal (a training batch, no padding) or under a
  (B, 1, T, S) boolean mask (padded rows, and every prefill or decode step over a KVCache).
- `SharedPrefix`: rows that all continue one prefix stored once (a few-shot header prefilled a single time):
  `shared_prefix_attention` merges attention over the shared keys and over each row's own.
- `TreeAttention`: packed and shared-prefix training rows (data.layout), segment by segment instead of
  under a dense (T, T) mask; `FlexTree`: the same rows through FlexAttention under a block mask (CUDA).
Both tree kernels place their tokens with `tree_positions`.
"""

import copy

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def window_mask(q_pos, k_pos, w):
    """(B, 1, T, S): key positions k_pos (B, S) less than w before query positions q_pos (B, T)."""
    return ((q_pos[:, :, None] - k_pos[:, None, :]) < w)[:, None]


class Dense:
    """SDPA: causal when mask is None, else under mask (B, 1, T, S) (True = attend). q_pos (B, T): the queries'
    positions, and k_pos (B, S) the keys' (or a function giving them; default: q_pos), for windowed()."""

    def __init__(self, mask=None, q_pos=None, k_pos=None):
        self.mask, self.q_pos, self.k_pos = mask, q_pos, k_pos

    def windowed(self, w):
        if self.mask is None and self.q_pos.shape[1] <= w:
            return self  # a plain causal row no longer than the window: nothing is out of reach
        k_pos = self.k_pos() if callable(self.k_pos) else self.q_pos if self.k_pos is None else self.k_pos
        near = window_mask(self.q_pos, k_pos, w)
        if self.mask is None:  # plain causal rows: positions are the slots, so the window is a band
            T = self.q_pos.shape[1]
            near = near & torch.ones(T, T, dtype=torch.bool, device=near.device).tril()
        return Dense(near if self.mask is None else self.mask & near, self.q_pos, k_pos)

    def attend(self, q, k, v, layer, scale=None):
        if q.shape[2] == 1 and self.mask is not None and q.shape[1] != k.shape[1]:  # a decode step, grouped heads
            out, _ = grouped_attention(q, k, v, self.mask, scale)  # SDPA would take its math path (below)
            return out.reshape(q.shape).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.mask is None,
                                           enable_gqa=q.shape[1] != k.shape[1], scale=scale)
        return y.transpose(1, 2)


def grouped_attention(q, k, v, mask, scale=None):
    """Softmax attention of q (B, nh, T, hd) over k/v (B, n_kv, S, hd) under mask (B, 1, T, S), for grouped-query
    heads: each K/V head is read once, by one matrix product for its group of query heads. (SDPA has no CUDA kernel
    for a masked call with grouped heads: it falls back to its math path, which copies K/V once per query head
    and writes the scores out -- for a decode step of 256 rows over 512 slots, three copies of the whole cache.)
    -> (out (B, n_kv, g*T, hd), where query head h = kv*g + j; the log-sum-exps (B, n_kv, g*T, 1))."""
    B, nh, T, hd = q.shape
    n_kv = k.shape[1]
    g = nh // n_kv
    s = (q.reshape(B, n_kv, g * T, hd) @ k.transpose(2, 3)).float() * (scale or hd ** -0.5)
    s = s.view(B, n_kv, g, T, -1).masked_fill(~mask[:, :, None], float("-inf")).view(B, n_kv, g * T, -1)
    lse = s.logsumexp(-1, keepdim=True)  # finite: a query always sees itself
    return (s - lse).exp().to(v.dtype) @ v, lse


class SharedPrefix:
    """Rows of a KVCache with a shared prefix (KVCache(shared=...)): each query sees the prefix's keys (those
    shared_mask (B, 1, T, P) allows: all, but in a window), then its own row's under mask (B, 1, T, S). q_pos (B, T):
    the queries' positions."""

    def __init__(self, mask, cache, q_pos, shared_mask=None):
        self.mask, self.cache, self.q_pos, self.shared_mask = mask, cache, q_pos, shared_mask

    def windowed(self, w):
        header = torch.arange(self.cache.shared.length, device=self.q_pos.device).expand(self.q_pos.shape[0], -1)
        near = window_mask(self.q_pos, self.cache.key_positions(self.mask.shape[-1]), w)
        return SharedPrefix(self.mask & near, self.cache, self.q_pos, window_mask(self.q_pos, header, w))

    def attend(self, q, k, v, layer, scale=None):
        return shared_prefix_attention(q, k, v, self.mask, *self.cache.shared_kv(layer), self.shared_mask,
                                       scale).transpose(1, 2)


def shared_prefix_attention(q, k, v, mask, k_shared, v_shared, shared_mask=None, scale=None):
    """Attention of q (B, nh, T, hd) over a prefix all B rows share (k/v_shared (n_kv, P, hd), seen by
    every query) followed by each row's own keys (k/v (B, n_kv, S, hd) under mask (B, 1, T, S)).

    This is softmax attention over the concatenation [shared; own], computed in two parts and merged by
    their log-sum-exps (as flash attention merges blocks), so the prefix is stored once, not per row.
    The shared part is one matrix product for all rows' queries against the same keys (Hydragen,
    Juravsky et al. 2024), instead of B matrix-vector products over B copies of the prefix. shared_mask
    (B, 1, T, P): the prefix keys each query sees (a sliding window), or None: all of them.
    """
    B, nh, T, hd = q.shape
    n_kv, P, _ = k_shared.shape
    g = nh // n_kv  # query heads per K/V head (grouped-query attention)
    qg = q.reshape(B, n_kv, g * T, hd)  # query head h = kv * g + j uses K/V head kv
    # shared prefix: (n_kv, B*g*T, hd) @ (n_kv, hd, P), every query sees every prefix key
    s1 = (qg.transpose(0, 1).reshape(n_kv, B * g * T, hd) @ k_shared.transpose(1, 2)).float() * (scale or hd ** -0.5)
    if shared_mask is not None:  # (B, 1, T, P) over (n_kv, B, g, T, P)
        s1 = s1.view(n_kv, B, g, T, P).masked_fill(~shared_mask[None], float("-inf")).view(n_kv, B * g * T, P)
    lse1 = s1.logsumexp(-1, keepdim=True)
    # a query that sees no prefix key (all of it out of its window): lse1 = -inf, its part weighs 0 below
    o1 = ((s1 - lse1.clamp(min=torch.finfo(s1.dtype).min)).exp().to(v_shared.dtype) @ v_shared)
    o1 = o1.view(n_kv, B, g * T, hd).transpose(0, 1)
    lse1 = lse1.view(n_kv, B, g * T, 1).transpose(0, 1)
    o2, lse2 = grouped_attention(q, k, v, mask, scale)  # each row's own keys, masked
    lse = torch.logaddexp(lse1, lse2)
    y = o1 * (lse1 - lse).exp().to(o1.dtype) + o2 * (lse2 - lse).exp().to(o2.dtype)
    return y.reshape(B, nh, T, hd)



def tree_positions(docs, branches):
    """Positions of packed and shared-prefix rows (data.layout), on the device (no host copy): a prefix's tokens
    count from 0, a branch's continue from its prefix's length."""
    B, T = docs.shape
    t = torch.arange(T, device=docs.device).expand(B, T)
    new = torch.ones(B, T, dtype=torch.bool, device=docs.device)
    new[:, 1:] = (docs[:, 1:] != docs[:, :-1]) | (branches[:, 1:] != branches[:, :-1])
    offset = t - torch.where(new, t, 0).cummax(1).values  # within the segment (a run of one doc and branch)
    is_prefix = ((branches == 0) & (docs >= 0)).long()
    slot = docs.clamp(min=-1) + 1  # group ids are < T; padding (-1) counts in slot 0
    prefix_len = torch.zeros(B, T + 1, dtype=torch.long, device=docs.device).scatter_add_(1, slot, is_prefix)
    return torch.where(branches == 0, offset, prefix_len.gather(1, slot) + offset)


class TreeAttention:
    """Attention for packed and shared-prefix rows (data.layout), segment by segment instead of under a
    dense (T, T) mask. docs (B, T): a token's group in its row (-1 = padding); branches (B, T): 0 = the
    group's prefix (a question), k = its k-th branch (a rationale), which sees the prefix and itself only.

    The prefixes, gathered into a (groups, P) batch, attend causally to themselves; the branches, gathered
    into a (branches, R) batch, attend to their group's prefix keys followed by their own, causally. That
    is the dense mask's attention exactly, for sum(P^2 + R * (P + R)) scores instead of T^2 a row: with a
    question's 30 rationales in one row (q = 70, r = 45: T = 1,420), 7x fewer. Positions: tree_positions.
    The gathers are built on the host from docs and branches (one device->host copy a batch); padding gets a
    zero output (it has no loss, nothing sees it).
    """

    def __init__(self, docs, branches=None):
        B, T = docs.shape
        device = docs.device
        branches = torch.zeros_like(docs) if branches is None else branches
        self.positions = tree_positions(docs, branches)
        prefixes, branch_rows, group_of = self._segments(docs.cpu(), branches.cpu())
        self.prefix_idx, self.prefix_valid = self._pad(prefixes, device)
        self.branch_idx, self.branch_valid = self._pad(branch_rows, device)
        self.branch_group = torch.tensor(group_of, dtype=torch.long, device=device)
        P, R = self.prefix_idx.shape[1], self.branch_idx.shape[1]
        causal_p = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        causal_r = torch.ones(R, R, dtype=torch.bool, device=device).tril()
        # (G, 1, P, P) and (NB, 1, R, P + R); a query always sees itself, so no row is all False
        prefix = (causal_p & self.prefix_valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)
        own = (causal_r & self.branch_valid[:, None, :]) | torch.eye(R, dtype=torch.bool, device=device)
        sees_prefix = self.prefix_valid[self.branch_group][:, None, :].expand(-1, R, -1)
        self.prefix_mask, self.branch_mask = prefix[:, None], torch.cat((sees_prefix, own), 2)[:, None]
        # the output: each token's row in [prefix outputs; branch outputs; a zero row for padding]
        where = self.prefix_valid.flatten().nonzero()[:, 0], self.branch_valid.flatten().nonzero()[:, 0]
        n_out = len(where[0]) + len(where[1])
        source = torch.full((B * T,), n_out, dtype=torch.long, device=device)
        source[self.prefix_idx[self.prefix_valid]] = torch.arange(len(where[0]), device=device)
        source[self.branch_idx[self.branch_valid]] = torch.arange(len(where[0]), n_out, device=device)
        self.valid_at, self.source, self.shape = where, source, (B, T)

    def windowed(self, w):
        """The same rows for a sliding-window layer: prefix tokens sit at their index in the prefix, a branch's
        at its prefix's length + its index."""
        new = copy.copy(self)
        P, R = self.prefix_idx.shape[1], self.branch_idx.shape[1]
        at = torch.arange(max(P, R), device=self.prefix_idx.device)
        new.prefix_mask = self.prefix_mask & window_mask(at[:P][None], at[:P][None], w)
        length = self.prefix_valid.sum(1)[self.branch_group][:, None]  # (NB, 1) each branch's prefix length
        keys = torch.cat((at[:P].expand(len(length), P), length + at[:R]), 1)  # (NB, P + R)
        new.branch_mask = self.branch_mask & window_mask(length + at[:R], keys, w)
        return new

    @staticmethod
    def _segments(d, br):
        """docs and branches on the host -> (each prefix's flat token indices, each branch's, each branch's
        prefix number). A segment is a run of equal (doc, branch); doc -1 is padding."""
        B, T = d.shape
        cuts = ((d[:, 1:] != d[:, :-1]) | (br[:, 1:] != br[:, :-1])).nonzero().tolist()
        starts = [[0] for _ in range(B)]
        for b, t in cuts:
            starts[b].append(t + 1)
        prefixes = {}  # (row, doc) -> the prefix's token indices
        branch_rows, group_of = [], []  # per branch: its tokens, its group
        order = {}  # (row, doc) -> its index among the prefixes
        for b in range(B):
            for s, e in zip(starts[b], starts[b][1:] + [T]):
                doc, k = int(d[b, s]), int(br[b, s])
                if doc < 0:
                    continue
                flat = list(range(b * T + s, b * T + e))
                if k == 0:
                    prefixes[(b, doc)] = flat
                    order[(b, doc)] = len(order)
                else:  # a branch follows its prefix (or has none: a one-token query)
                    prefixes.setdefault((b, doc), [])
                    branch_rows.append(flat)
                    group_of.append(order.setdefault((b, doc), len(order)))
        return list(prefixes.values()), branch_rows, group_of

    @staticmethod
    def _pad(rows, device):
        """Lists of flat token indices -> (n, L) indices (padding points at token 0) and (n, L) validity."""
        L = max((len(r) for r in rows), default=0) or 1
        idx = torch.zeros(len(rows), L, dtype=torch.long)
        valid = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            idx[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            valid[i, :len(r)] = True
        return idx.to(device), valid.to(device)

    def attend(self, q, k, v, layer=None, scale=None):
        """q (B, nh, T, hd), k/v (B, n_kv, T, hd) -> (B, T, nh, hd). Gathers are index_select (their
        backward an index_add, not a sorting index_put), of q, k and v together."""
        B, T = self.shape
        nh, n_kv, hd = q.shape[1], k.shape[1], q.shape[3]
        qkv = torch.cat((q, k, v), 1).transpose(1, 2).reshape(B * T, nh + 2 * n_kv, hd)  # token-major

        def gather(idx):  # (n, L) token indices -> q (n, nh, L, hd), k and v (n, n_kv, L, hd)
            x = qkv.index_select(0, idx.flatten()).view(*idx.shape, nh + 2 * n_kv, hd).transpose(1, 2)
            return x.split((nh, n_kv, n_kv), 1)

        def valid_rows(y, at):  # (n, nh, L, hd) -> the real positions' rows (N, nh, hd)
            return y.transpose(1, 2).reshape(-1, nh, hd).index_select(0, at)

        gqa = nh != n_kv
        qp, kp, vp = gather(self.prefix_idx)
        out = [valid_rows(F.scaled_dot_product_attention(qp, kp, vp, attn_mask=self.prefix_mask, enable_gqa=gqa,
                                                         scale=scale), self.valid_at[0])]
        if self.branch_idx.shape[0]:
            qb, kb, vb = gather(self.branch_idx)
            kb = torch.cat((kp.index_select(0, self.branch_group), kb), 2)  # its prefix's keys, then its own
            vb = torch.cat((vp.index_select(0, self.branch_group), vb), 2)
            out.append(valid_rows(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=self.branch_mask,
                                                                 enable_gqa=gqa, scale=scale), self.valid_at[1]))
        out.append(q.new_zeros(1, nh, hd))  # padding's output
        return torch.cat(out).index_select(0, self.source).view(B, T, nh, hd)



class FlexTree:
    """TreeAttention's attention through PyTorch's FlexAttention: one kernel over the whole (B, T) rows under a
    block-sparse mask (a BlockMask, built once per batch and used by every layer) instead of gathering the
    prefixes and branches into batches of their own. The mask: a token sees the earlier tokens of its own group
    that are its prefix's (branch 0) or its own branch's; padding sees only itself (its output is never used).
    Positions are computed on the device (no host copy). On CUDA flex_attention is compiled into a fused
    kernel; on a CPU it runs unfused (fine for the tests, slow for training)."""

    def __init__(self, docs, branches=None, window=None):
        B, T = docs.shape
        branches = torch.zeros_like(docs) if branches is None else branches
        self.docs, self.branches = docs, branches
        self.positions = positions = tree_positions(docs, branches)

        def mask_mod(b, h, q, kv):
            own = (docs[b, q] == docs[b, kv]) & (docs[b, q] >= 0) & (kv <= q)
            if window is not None:
                own = own & (positions[b, q] - positions[b, kv] < window)
            return (own & ((branches[b, kv] == 0) | (branches[b, kv] == branches[b, q]))) | (q == kv)

        self.block_mask = create_block_mask(mask_mod, B, None, T, T, device=docs.device)

    def windowed(self, w):
        return FlexTree(self.docs, self.branches, w)

    def attend(self, q, k, v, layer=None, scale=None):
        y = _flex_attention(q.device)(q, k, v, block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1],
                                      scale=scale)
        return y.transpose(1, 2)


_FLEX = {}


def _flex_attention(device):
    """flex_attention, compiled once on CUDA (a fused kernel), as it is elsewhere (a CPU: eager, unfused)."""
    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _FLEX:
        _FLEX["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["cuda"]
