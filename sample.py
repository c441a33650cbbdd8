"""Batched decoding for self-consistency (SCoTD §3): one prefill per question, N chains from its cache.

HF `generate(num_return_sequences=N)` prefills each prompt N times and keeps finished rows in the batch
until the longest is done. Here a batch of questions is prefilled once (left-padded), each question's
KV cache is repeated to N rows (a few-shot header common to all questions is prefilled once per run and
attended to by every row from one copy), and rows that hit a stop string, EOS or `max_new_tokens` leave the
running batch (in bulk, once a quarter of it is done), so the last long chain does not pay for the
finished ones. Sampling inverts the CDF with one uniform per row, on the device, so it needs no
device->host sync; stops are checked every `check_every` steps (1 on CPU, where a sync costs nothing).
"""

import re
import weakref
from dataclasses import dataclass, replace
from functools import partial

import torch

from attention import Dense, SharedPrefix
from cli import check_fits


@dataclass
class SampleConfig:
    n: int = 1  # chains per question
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_new_tokens: int = 96
    stop: tuple = ("\n\n",)  # strings that end a chain; cut off
    stop_after: tuple = ()  # regular expressions that end a chain; kept (e.g. the end of the answer sentence)
    batch_size: int = 8  # questions per prefill; the running batch is batch_size * n rows
    seed: int = 0
    check_every: int = 0  # steps between stop checks; 0 = 1 on CPU, 8 on CUDA
    compile: bool = False  # torch.compile the one-token decode step (static: attends over all cache slots;
    # on CUDA mode="reduce-overhead": replayed as CUDA graphs)
    bucket_rows: bool | None = None  # running rows padded to a power of two (None: when compiled), so that
    # finished rows leaving the batch give a few shapes, each compiled (and captured) once
    logprobs: bool = False  # also return each chain's summed log-probability under the model (at T = 1)
    eos_id: int | None = None  # the token that ends a chain (None: only stops and max_new_tokens do; for_model)
    pad_id: int = 0  # fills left-padded prompts (masked: any id serves)

    def for_model(self, model):
        """This config with the model's own EOS and pad ids (its config.json's)."""
        return replace(self, eos_id=model.cfg.eos_token_id, pad_id=model.cfg.pad_token_id)


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
        # L x (B, n_kv, S, hd)
        self.k = [alloc(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [alloc(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)  # (B, S)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the next slot, on the device (== length)
        self.length = 0  # slots filled so far, the same for every row
        self.static = static  # decode steps attend over all slots (fixed shapes) rather than the filled ones
        assert shared is None or (shared.batch_size == 1 and shared.shared is None), "shared: a one-row cache"
        self.shared = shared  # the prefix every row continues from (all real tokens), or None
        self.offset = shared.length if shared is not None else 0  # positions of this cache's tokens start here
        # (B,): the position of each row's next token
        self.pos = torch.full((batch_size,), self.offset, dtype=torch.long, device=device)
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

    def attention(self, mask, positions):
        """How a prefill or decode step over this cache attends (attention.py), under mask (B, 1, T, S), its
        queries at `positions` (B, T) (a sliding window needs them, and the keys' positions: key_positions)."""
        if self.shared is None:
            return Dense(mask, positions, lambda: self.key_positions(mask.shape[-1]))
        return SharedPrefix(mask, self, positions)

    def key_positions(self, n):
        """The positions of the first n slots' tokens (B, n): counted over the real slots, from the offset (a
        slot not yet written, or padding, gets a position too; the mask leaves it out)."""
        return self.offset + self.valid[:, :n].long().cumsum(1) - 1

    def shared_kv(self, layer):
        """The shared prefix's K/V for `layer`: (n_kv, P, hd) each."""
        P = self.shared.length
        return self.shared.k[layer][0, :, :P], self.shared.v[layer][0, :, :P]

    def attended(self):
        """Slots a decode step attends over: all of them when static, else the filled ones and the new one."""
        return self.max_seq_len if self.static else self.length + 1

    def _view(self, k, v, valid, pos):
        new = object.__new__(KVCache)
        new.k, new.v, new.valid, new.pos = k, v, valid, pos
        new.slot, new.length, new.static = self.slot, self.length, self.static
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


def batch_seed(seed, k):
    """The seed of unit k (a batch of questions, or a question's k-th request) of a run seeded with `seed`."""
    return seed * 1_000_003 + k


def next_token(logits, cfg, generator):
    """logits (R, V) -> (R, 1) token ids: greedy at temperature 0, else sampled (sample_token)."""
    return logits.argmax(-1, keepdim=True) if cfg.temperature <= 0 else sample_token(logits, cfg, generator)


def sample_token(logits, cfg, generator):
    """logits (R, V) -> (R, 1) token ids drawn at cfg.temperature, within cfg.top_k and cfg.top_p."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # inverse CDF: one uniform per row. (The exponential race, argmax of p / Exp(1), draws one random
    # number per vocabulary entry: 20x slower on CPU.) Dividing by the row's total makes the last entry
    # exactly 1 > u, so the draw always lands on a token with non-zero probability.
    cdf = logits.softmax(-1).cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator)
    return torch.searchsorted(cdf, u, right=True)  # the first token whose cdf exceeds u


def batch_slices(n_prompts, batch_size):
    """Question batch k is prompts [k * batch_size, (k + 1) * batch_size): the unit of prefill and of seeding."""
    return [range(s, min(s + batch_size, n_prompts)) for s in range(0, n_prompts, batch_size)]


def left_pad(prompts, pad_id, device):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = True
    return ids.to(device), mask.to(device)


def _finished(tokens, n_new, tokenizer, cfg, eos_id):
    """Did the last n_new tokens end the chain (EOS, or completing a stop string)?"""
    if eos_id is not None and eos_id in tokens[-n_new:]:
        return True
    if not cfg.stop and not cfg.stop_after:
        return False
    # a stop string spans a few tokens at most; a stop_after match (a sentence) can be longer
    tail = tokenizer.decode(tokens[-(n_new + (48 if cfg.stop_after else 8)):], skip_special_tokens=False)
    return any(s in tail for s in cfg.stop) or any(re.search(p, tail) for p in cfg.stop_after)


@torch.no_grad()
def prefill(model, ids):
    """A one-row cache of `ids` (a header every prompt starts with), for generate(prefix=...); a cache
    already prefilled is returned as it is, and no ids (None or []) give None."""
    if ids is None or isinstance(ids, KVCache):
        return ids
    if not ids:
        return None
    check_fits(model.cfg, len(ids) + 1, f"the shared header ({len(ids):,} tokens) and a token after it",
               "a shorter header (fewer shots, a shorter --prompt file)")
    p = next(model.parameters())
    header = KVCache(model.cfg, 1, len(ids), device=p.device, dtype=p.dtype)
    model.prefill(torch.tensor([ids], device=p.device), header)
    return header


@torch.no_grad()
def generate(model, tokenizer, prompts, cfg, batches=None, prefix=None, on_batch=None):
    """prompts: list of token-id lists -> per prompt, cfg.n dicts {"tokens", "text"}; text is cut at the
    first stop string (which is dropped) and tokens at EOS. tokenizer may be None when cfg.stop is empty
    (then only EOS and max_new_tokens end a chain).

    Prompts are taken in `batch_slices`; batch k draws from its own generator seeded by (cfg.seed, k),
    so a run restricted to some `batches` (one rank's share, or what a resumed run still lacks) samples
    exactly what the full run samples for them. Prompts outside `batches` get None.

    `on_batch(indices, outs)` is called as each batch finishes (a progress bar, or writing it out at once).

    `prefix`: token ids every prompt starts with (a few-shot header), or `prefill(model, ids)` of them for a
    caller that calls generate() many times with one header. It is prefilled once, and its cache
    is shared by every row of every batch without a copy (KVCache(shared=...)); a batch prefills only its
    own prompts (left-padded after the header: padding is masked and skipped by positions, so the result
    is that of prefix + prompt)."""
    assert tokenizer is not None or not cfg.stop, "stop strings need the tokenizer to decode"
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cfg = replace(cfg, check_every=cfg.check_every or (8 if device.type == "cuda" else 1))
    shared = isinstance(prefix, KVCache)
    prompt = (prefix.length if shared else len(prefix or [])) + max(map(len, prompts), default=0)
    check_fits(model.cfg, prompt + cfg.max_new_tokens, f"the longest prompt ({prompt:,} tokens"
               f"{' with the header' if prefix else ''}) + max_new_tokens {cfg.max_new_tokens}",
               "shorten the prompt or lower max_new_tokens")
    decode = compiled_decode_step(model, device) if cfg.compile else model.decode_step
    header = prefill(model, prefix)  # one prefill for the whole run
    results = [None] * len(prompts)
    layout = batch_slices(len(prompts), cfg.batch_size)
    for k in (range(len(layout)) if batches is None else batches):
        generator = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, k))
        batch = list(layout[k])
        ids, mask = left_pad([prompts[i] for i in batch], cfg.pad_id, device)
        slots = ids.shape[1] + cfg.max_new_tokens
        if cfg.compile:  # static shapes: cache sizes in steps of 64, so that batches share compiled steps
            slots = min(-(-slots // 64) * 64, model.cfg.max_position_embeddings - (header.length if header else 0))
        cache = KVCache(model.cfg, len(batch), slots, device=device, dtype=dtype, static=cfg.compile, shared=header)
        logits = model.prefill(ids, cache, mask)[:, -1].repeat_interleave(cfg.n, 0)  # one prefill a question: (B*n, V)
        cache = cache.repeat_rows(cfg.n)
        rows = [(q, c) for q in batch for c in range(cfg.n)]  # which (question, chain) each running row is
        out, logprobs, _ = _sample_rows(decode, cache, logits, rows, cfg, generator, tokenizer)
        for q in batch:
            results[q] = [_clean(out[(q, c)], tokenizer, cfg, logprobs.get((q, c))) for c in range(cfg.n)]
        if on_batch:
            on_batch(batch, [results[q] for q in batch])
    return results


@torch.no_grad()
def chain_logprobs(model, prompts, chains, prefix=None, batch_size=2, batches=None, on_batch=None, top_k=0):
    """How likely the model finds chains it did not necessarily write (scoring a teacher's corpus):
    prompts, one token-id list a question; chains, per question a list of token-id lists -> per question, per
    chain (its summed log-probability, its token count); the first token is scored from the prompt's last
    position, each next one from the token before it, at T = 1 -- what a plain forward pass over prefix +
    prompt + chain gives (tested), and what generate(logprobs=True) records for the chains it samples.

    The work is generate()'s prefill: the header (`prefix`) once for the run, a batch of questions' prompts
    once, each prompt's cache copied to its chains' rows, which are then run in one forward pass. batches and
    on_batch(indices, outs) as generate()'s.

    top_k K: each chain's tuple also has, for each of its tokens' positions, the model's K likeliest tokens there
    and their log-probabilities (numpy (n, K) int32 and float32; what teacher.py --top-logprobs stores)."""
    device, dtype, pad_id = next(model.parameters()).device, next(model.parameters()).dtype, model.cfg.pad_token_id
    header = prefill(model, prefix)
    longest = max((len(p) + max(map(len, c), default=0) for p, c in zip(prompts, chains)), default=0)
    check_fits(model.cfg, (header.length if header else 0) + longest, "the longest prompt + chain to score",
               "fewer shots, or leave the longest chains out")
    results, layout = [None] * len(prompts), batch_slices(len(prompts), batch_size)
    for k in range(len(layout)) if batches is None else batches:
        batch = list(layout[k])
        n = max(1, max(len(chains[q]) for q in batch))  # rows a question; shorter lists get empty rows
        rows = [chains[q][c] if c < len(chains[q]) else [] for q in batch for c in range(n)]
        ids, mask = left_pad([prompts[q] for q in batch], pad_id, device)
        longest = max(1, max(map(len, rows)))
        cache = KVCache(model.cfg, len(batch), ids.shape[1] + longest, device=device, dtype=dtype, shared=header)
        first = model.prefill(ids, cache, mask)[:, -1].float().log_softmax(-1)
        cache = cache.repeat_rows(n)
        tokens = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        real = torch.zeros(len(rows), longest, dtype=torch.bool)
        for r, chain in enumerate(rows):
            tokens[r, :len(chain)], real[r, :len(chain)] = torch.tensor(chain, dtype=torch.long), True
        logp = model.prefill(tokens.to(device), cache, real.to(device), last_only=False).float().log_softmax(-1)
        if top_k:  # (rows, longest, K): the first token's from the prompt's last position, then the chain's own
            head, rest = first.topk(top_k, -1), logp[:, :-1].topk(top_k, -1)
            top_ids = torch.cat((head.indices.repeat_interleave(n, 0)[:, None], rest.indices), 1).int().cpu().numpy()
            top_logp = torch.cat((head.values.repeat_interleave(n, 0)[:, None], rest.values), 1).cpu().numpy()
        for j, q in enumerate(batch):
            results[q] = []
            for c, chain in enumerate(chains[q]):
                r = j * n + c
                after = torch.tensor(chain[1:], dtype=torch.long, device=device)  # each token after the first
                rest = logp[r, torch.arange(len(chain) - 1, device=device), after].sum() if chain else 0
                results[q].append((float(first[j, chain[0]] + rest) if chain else 0.0, len(chain)))
                if top_k:
                    results[q][-1] += (top_ids[r, :len(chain)], top_logp[r, :len(chain)])
        if on_batch:
            on_batch(batch, [results[q] for q in batch])
    return results


def bucket(n, most):
    """n running rows padded to the next power of two, at most `most` (the rows there are now)."""
    return min(most, 1 << (n - 1).bit_length())


def compiled_decode_step(model, device):
    """model.decode_step with its device work compiled (gpt-fast; generate's cfg.compile): on CUDA with
    mode="reduce-overhead", so it is replayed as a CUDA graph (one per running-row bucket and cache), its launches
    no longer paid per step. Compiled once a model and kept on it."""
    if model not in COMPILED:  # once a model: evaluate.py calls generate() a batch at a time
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # a graph a shape
        COMPILED[model] = torch.compile(model.step_tensors, mode="reduce-overhead") if device.type == "cuda" \
            else torch.compile(model.step_tensors, dynamic=True)
    return partial(model.decode_step, step=COMPILED[model])


COMPILED = weakref.WeakKeyDictionary()  # model -> its compiled decode step (decode_step)


def _sample_rows(decode, cache, logits, rows, cfg, generator, tokenizer, compact=True):
    """Sample from `logits` (one row per entry of `rows`) until every row has finished -> ({row: its tokens},
    {row: each token's log-probability under the model} (empty unless cfg.logprobs), the steps run), checking
    for finished rows every cfg.check_every steps. Every step's tokens but the last are written to the cache, for
    every running row.
    compact: finished rows leave the running batch (and the cache); else they run on to the end. With
    cfg.bucket_rows (default: when compiled) the rows left are padded to a power of two (copies of a running
    row, whose tokens are dropped), so the decode step sees a few batch shapes only."""
    bucketed = cfg.compile if cfg.bucket_rows is None else cfg.bucket_rows
    out = {row: [] for row in rows}
    logprobs = {row: [] for row in rows} if cfg.logprobs else {}
    done = set()  # finished rows still in the running batch
    pending, pending_lp = [], []  # sampled tokens (and their log-probabilities) not yet copied to the host
    for step in range(cfg.max_new_tokens):
        tok = next_token(logits, cfg, generator)  # (R, 1)
        pending.append(tok)
        if cfg.logprobs:  # the model's own probability of the token (T = 1, no top-p), as an API reports it
            pending_lp.append(logits.float().log_softmax(-1).gather(-1, tok))
        last = step == cfg.max_new_tokens - 1
        if len(pending) == cfg.check_every or last:
            new = torch.cat(pending, 1).tolist()  # the only device->host copy
            new_lp = torch.cat(pending_lp, 1).tolist() if cfg.logprobs else None
            pending, pending_lp = [], []
            for r, row in enumerate(rows):
                if row is not None and row not in done:  # None: a padding row (bucket_rows)
                    out[row] += new[r]
                    if cfg.logprobs:
                        logprobs[row] += new_lp[r]
                    if _finished(out[row], len(new[r]), tokenizer, cfg, cfg.eos_id):
                        done.add(row)
            live = sum(row is not None for row in rows)
            if len(done) == live or last:
                break
            # finished chains leave the running batch; compacting moves every later row's cache
            # slots, so it waits until a quarter of the rows are done (at most 25 % of rows wasted)
            if compact and 4 * len(done) >= live:
                keep = [r for r, row in enumerate(rows) if row is not None and row not in done]
                keep += [keep[-1]] * (bucket(len(keep), len(rows)) - len(keep) if bucketed else 0)  # padding rows
                rows = [rows[r] for r in keep[:live - len(done)]] + [None] * (len(keep) + len(done) - live)
                cache, tok, done = cache.select_rows(keep), tok[keep], set()
        logits = decode(tok, cache)[:, -1]
    return out, logprobs, step + 1


@torch.no_grad()
def generate_turns(models, tokenizer, prompts, cfgs, turn, max_len, prefix=None):
    """Run one dialogue per prompt, all of them in one batch, and return each row's outputs in turn order.

    The models take turns: turn t of every running row is written by models[t % len(models)] with
    cfgs[t % len(models)] -- one model talking to itself, or a decomposer and a solver alternating. Each turn
    ends at its stop, as generate() ends a chain. Then `turn(i, m, output)` says what comes next for row i: the
    token ids appended after its output (possibly none), or None when the row's dialogue is over.

    Every model keeps one KV cache of each row's text. Before a turn it prefills only what it has not read yet
    (the text appended since, and the other models' turns), so k turns cost one prefill of the whole text per
    model, not k. Tokens a row sampled after its stop are masked out of the cache. `max_len` is the number of
    cache slots (every turn's tokens). Each cfg must ask for one chain (n = 1); model m samples from its own
    generator, seeded with cfgs[m].seed, and ends its turns at cfgs[m].eos_id."""
    assert all(cfg.n == 1 for cfg in cfgs) and len(cfgs) == len(models), "one chain a row, one cfg a model"
    assert len(models) == 1 or not isinstance(prefix, KVCache), "a prefilled header belongs to one model"
    device, dtype = next(models[0].parameters()).device, next(models[0].parameters()).dtype
    generators = [torch.Generator(device=device).manual_seed(cfg.seed) for cfg in cfgs]
    text = [list(p) for p in prompts]  # each row's dialogue so far (token ids)
    read = [[0] * len(prompts) for _ in models]  # how much of it each model's cache holds
    caches, cached = [None] * len(models), [None] * len(models)  # per model: its cache, and whose rows it holds
    rows, outputs, t = list(range(len(prompts))), [[] for _ in prompts], 0
    while rows:
        m, t = t % len(models), t + 1
        model, cfg = models[m], cfgs[m]
        if caches[m] is None:
            caches[m] = KVCache(model.cfg, len(rows), max_len, device=device, dtype=dtype,
                                shared=prefill(model, prefix))
        else:  # rows whose dialogue ended since this model's last turn leave its cache
            where = {i: r for r, i in enumerate(cached[m])}
            caches[m] = caches[m].select_rows([where[i] for i in rows])
        cache, cached[m] = caches[m], rows
        unread = [text[i][read[m][i]:] for i in rows]
        assert all(unread), "a turn continues from at least one token the model has not read"
        reach = max(pos + len(u) for pos, u in zip(cache.pos.tolist(), unread)) + cfg.max_new_tokens
        check_fits(model.cfg, reach, f"a dialogue's turn {t} (its text so far + max_new_tokens {cfg.max_new_tokens})",
                   "fewer rounds (--max-rounds) or a lower --max-new-tokens")
        ids, mask = left_pad(unread, cfg.pad_id, device)
        logits = model.prefill(ids, cache, mask)[:, -1]
        start = cache.length
        out, logprobs, steps = _sample_rows(model.decode_step, cache, logits, rows, replace(cfg, check_every=1),
                                            generators[m], tokenizer, compact=False)
        going = []
        for r, i in enumerate(rows):
            kept = _clean(out[i], tokenizer, cfg, logprobs.get(i))
            outputs[i].append(kept)
            written = min(len(kept["tokens"]), steps - 1)  # the last step's tokens are not in the cache
            cache.valid[r, start + written:start + steps - 1] = False  # what it sampled after its stop
            read[m][i] = len(text[i]) + written
            follow = turn(i, m, kept)
            text[i] += kept["tokens"] + list(follow or [])
            if follow is not None:
                going.append(i)
        rows = going
    return outputs


def _clean(tokens, tokenizer, cfg, logprobs=None):
    """A chain cut at EOS or just after the token that completes the first stop (a stop string is dropped, a
    stop_after match kept) -> {"tokens", "text"} (text None without a tokenizer: no stop strings to cut at), and
    with the tokens' `logprobs` the kept tokens' sum, "logprob"."""
    if cfg.eos_id is not None and cfg.eos_id in tokens:
        tokens = tokens[:tokens.index(cfg.eos_id)]
    text = None
    if tokenizer is not None:
        decode = lambda k: tokenizer.decode(tokens[:k], skip_special_tokens=False)  # noqa: E731
        text = decode(len(tokens))
        cuts = [(text.index(s), lambda t, s=s: s in t) for s in cfg.stop if s in text]  # (text end, "is it complete")
        cuts += [(m.end(), lambda t, e=m.end(): len(t) >= e) for m in (re.search(p, text) for p in cfg.stop_after) if m]
        if cuts:
            end, complete = min(cuts, key=lambda c: c[0])
            tokens = tokens[:next(k for k in range(1, len(tokens) + 1) if complete(decode(k)))]
            text = text[:end]
    chain = {"tokens": tokens, "text": text}
    if logprobs is not None:
        chain["logprob"] = sum(logprobs[:len(tokens)])
    return chain
