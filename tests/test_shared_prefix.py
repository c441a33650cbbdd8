"""Shared-prefix training (data.layout(share=True)): a question once, its rationales as branches of one row.

The claim: the loss and every gradient equal those of the K separate examples, for q + K*r tokens instead
of K*(q + r). Checked on tiny random OPT (pre-LN and post-LN: learned positions with their offset),
Llama and Qwen2 (RoPE), in fp32 to 1e-5, with packing, and with a question that spills into two rows.
"""

from argparse import Namespace

import numpy as np
import pytest
import torch

import data
import distributed
import train
from checkpoint import from_pretrained
import attention
from helpers import make_hf_model, save_hf

torch.set_num_threads(2)
KINDS = ["opt-preln", "opt-postln", "llama-untied", "qwen2-tied"]


def examples(seed=0):
    """Two questions (9 and 6 query tokens) with 3 and 2 rationales of different lengths, interleaved,
    and a third question with one: (ids, n_query) as data.tokenize_examples gives them."""
    g = np.random.default_rng(seed)
    q1, q2, q3 = g.integers(3, 99, 9), g.integers(3, 99, 6), g.integers(3, 99, 7)
    out = []
    for q, n in ((q1, 4), (q2, 7), (q1, 2), (q3, 5), (q1, 6), (q2, 3)):
        out.append((np.concatenate([q, g.integers(3, 99, n)]).astype(np.int32), len(q)))
    return out


def loss_and_grads(model, rows, kernel="gather"):
    model.zero_grad()
    idx, targets, *layout, _ = rows  # collate: no docs and branches
    _, loss = model(idx, targets, docs=layout[0] if layout else None, branches=layout[1] if layout else None,
                    tree_kernel=kernel)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["shared", "shared+packed", "spilled"])
@pytest.mark.parametrize("kernel", ["gather", "flex"])
def test_shared_rows_give_the_loss_and_gradients_of_separate_examples(kind, how, kernel, tmp_path):
    """Shared-prefix (and packed, and spilled) rows against the examples one a row: the same loss and gradients
    (fp32, 1e-5) through attention.TreeAttention; the same loss through FlexTree (FlexAttention has no backward
    on a CPU: its gradients are compared on a GPU, bench/gpu.sh)."""
    model = from_pretrained(save_hf(make_hf_model(kind), tmp_path))
    batch = examples()
    separate = loss_and_grads(model, data.collate(batch, pad_id=0))
    # spilled: a row budget of 15 tokens fits question 1's prefix (8) and one or two branches, not all three
    row_len = {"shared": 512, "shared+packed": 512, "spilled": 15}[how]
    rows = data.layout(batch, 0, row_len, share=True, pack=how == "shared+packed")
    idx, targets, docs, branches, _ = rows
    if how == "shared":
        assert idx.shape[0] == 3 and int(branches.max()) == 3  # three questions, the first with three branches
        assert idx.numel() < sum(len(t) - 1 for t, _ in batch)  # fewer tokens than the examples
    if how == "shared+packed":
        assert idx.shape[0] == 1 and int(docs.max()) == 2  # all three groups in one row
    if how == "spilled":
        assert idx.shape[0] == 4  # question 1 split over two rows, its prefix in both
    assert int((targets != -100).sum()) == sum(len(t) - n for t, n in batch)  # the same target tokens
    if kernel == "flex":
        with torch.no_grad():
            torch.testing.assert_close(model(idx, targets, docs=docs, branches=branches, tree_kernel=kernel)[1],
                                       separate[0], atol=1e-5, rtol=0)
        return
    assert_same(loss_and_grads(model, rows), separate)


def test_a_branch_does_not_see_another(tmp_path):
    """Changing one rationale's tokens changes no other branch's logits, nor the prefix's (the mask isolates
    branches), and does change its own."""
    model = from_pretrained(save_hf(make_hf_model("llama-tied"), tmp_path))
    batch = examples()
    ids, n = batch[2]  # question 1's second rationale: row 0, branch 2
    changed = batch[:2] + [(np.concatenate([ids[:n], (ids[n:] + 1) % 99]).astype(np.int32), n)] + batch[3:]
    logits = []
    for b in (batch, changed):
        idx, _, docs, branches, _ = data.layout(b, 0, 512, share=True)
        with torch.no_grad():
            logits.append(model(idx, docs=docs, branches=branches)[0])
    own = torch.zeros_like(branches, dtype=torch.bool)
    own[0] = branches[0] == 2
    torch.testing.assert_close(logits[0][~own], logits[1][~own], atol=0, rtol=0)
    assert not torch.allclose(logits[0][own], logits[1][own])


def test_question_batches_cover_every_example_once_and_keep_questions_together():
    rng = np.random.default_rng(0)
    queries = [int(q) for q in rng.integers(0, 100, 2000)]  # 100 questions, ~20 examples each
    lengths = list(rng.integers(20, 120, 2000))
    batches = data.question_batches(queries, lengths, 8, np.random.default_rng(1))
    assert sorted(i for b in batches for i in b) == list(range(2000))
    questions_per_batch = np.mean([len({queries[i] for i in b}) for b in batches])
    assert questions_per_batch < 2  # vs ~7.7 of 8 for random batches


def test_training_steps_give_the_same_weights_both_ways(tmp_path):
    """Four AdamW steps on the same question-grouped batches, plain rows vs shared-prefix rows: the same
    weights (1e-5). Adam's eps is raised to 1e-4 here: some gradient entries are ~1e-8 (a key bias under
    RoPE), where the two layouts' rounding differs in relative terms and Adam's m / sqrt(v) would turn
    that into lr-sized steps; with the larger eps such entries barely move either way."""
    batch = examples()
    weights = []
    for shared in (False, True):
        model = from_pretrained(save_hf(make_hf_model("qwen2-untied"), tmp_path / str(shared)))
        args = Namespace(pack=False, shared=shared, row_len=512, tree_kernel="gather")
        optimizer = train.make_optimizer(model, 1e-2, 0.1, "cpu")
        for group in optimizer.param_groups:
            group["eps"] = 1e-4
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for step in range(4):
            window = [data.to_tensors(batch[:3], args, 0, "cpu"), data.to_tensors(batch[3:], args, 0, "cpu")]
            train.train_step(model, optimizer, scaler, window, torch.autocast("cpu", enabled=False), 1.0)
        weights.append({k: p.detach().clone() for k, p in model.named_parameters()})
    moved = max(float((weights[0][k] - p0).abs().max()) for k, p0 in
                from_pretrained(tmp_path / "False").state_dict().items() if k in weights[0])
    assert moved > 1e-2  # the steps really changed the weights
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shares_are_contiguous_slices_that_cover_the_batch(world):
    batch = list(range(8))
    shares = [distributed.rank_share(batch, Namespace(rank=r, world=world), True) for r in range(world)]
    assert sum(shares, []) == batch and max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [distributed.rank_share(batch, Namespace(rank=r, world=world), False) for r in range(world)][0] == batch[::world]


@pytest.mark.parametrize("kernel", ["TreeAttention", "FlexTree"])
def test_tree_attention_is_the_dense_tree_mask_attention(kernel):
    """attention.TreeAttention (segment by segment) and attention.FlexTree (FlexAttention under a BlockMask)
    against one SDPA over the dense (T, T) tree mask (a token sees the earlier tokens of its group's prefix and
    of its own branch): rows packing two groups, a group whose branches spill to the next row, a one-token query
    with no prefix, padding; grouped-query heads. Equal outputs on every real token (1e-6, fp32), padding's zero
    (TreeAttention; FlexTree's padding attends to itself, an output no loss reads), and the positions the
    mask implies."""
    docs = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1],
                         [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, -1],
                         [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, -1]])
    branches = torch.tensor([[0, 0, 0, 1, 1, 2, 0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 2, 2, 2, 3, 1, 1, 2, 0],  # doc 1: two branches, no prefix
                             [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0]])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, 12, 8, generator=g) for h in (4, 2, 2))
    tree = getattr(attention, kernel)(docs, branches)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    mask = (docs[:, :, None] == docs[:, None, :]) & causal
    mask &= (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
    mask |= torch.eye(12, dtype=torch.bool)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    real = docs >= 0
    out = tree.attend(q, k, v)
    torch.testing.assert_close(out[real], dense.transpose(1, 2)[real], atol=1e-6, rtol=0)
    assert kernel == "FlexTree" or out[~real].abs().max() == 0
    implied = (mask & real[:, None, :]).sum(-1) - 1  # the real tokens a token sees, itself excluded
    assert torch.equal(tree.positions[real], implied[real])


def test_a_masked_decode_step_with_grouped_heads_reads_each_kv_head_once(monkeypatch):
    """A decode step (one query a row) over a cache with padding and unfilled slots, grouped-query heads:
    attention.Dense takes grouped_attention (a matrix product per K/V head, no per-query-head copy of K/V) and
    equals SDPA over K/V repeated per query head, in float64 (1e-6, fp32 inputs), at every row."""
    g = torch.Generator().manual_seed(0)
    B, S = 5, 40
    q, k, v = torch.randn(B, 9, 1, 64, generator=g), torch.randn(B, 3, S, 64, generator=g), torch.randn(B, 3, S, 64, generator=g)
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.5
    mask[..., 30:] = False  # slots not filled yet
    mask[..., 29] = True  # the step's own slot
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(3, 1),
                                                           v.double().repeat_interleave(3, 1), attn_mask=mask)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", None)  # not SDPA's (math) path
    out = attention.Dense(mask).attend(q, k, v, 0)
    assert out.shape == (B, 1, 9, 64)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=1e-6, rtol=0)
