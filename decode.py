"""Decoding as the method uses it, shared by evaluate.py and train.py's dev accuracy: greedy answers (with the
label-first fast path), the answers chains commit to, and Socratic CoT's two-model dialogue (Shridhar et al.
2022). sample.py does the batched decoding itself; scotd.py reads the answers.
"""

from dataclasses import replace

import torch

from sample import SampleConfig, batch_seed, batch_slices, generate, generate_turns
from scotd import LABEL_FIRST, STOP, SUB, extract_answer, socratic_line, states_answer


def greedy(model, tokenizer, prompts, mode, max_new_tokens=96, batch_size=16, seed=0, compile=False,
           batches=None, on_batch=None):
    """Greedy continuations. Label-first students ("post", "label") state the answer first: decoding stops
    after the answer sentence (the fast path Wadhwa et al. 2024 point to), not after the rationale."""
    fast = mode in LABEL_FIRST
    cfg = SampleConfig(n=1, temperature=0.0, max_new_tokens=min(24, max_new_tokens) if fast else max_new_tokens,
                       stop=(". ", STOP) if fast else (STOP,), batch_size=batch_size, seed=seed, compile=compile)
    return generate(model, tokenizer, prompts, cfg, eos_id=model.cfg.eos_token_id, pad_id=model.cfg.pad_token_id,
                    batches=batches, on_batch=on_batch)


class Socratic:
    """The bookkeeping of Socratic CoT's two-model dialogue, for sample.generate_turns. Each row of the batch holds
    one chain. Each round has two turns: first the decomposer writes a sub-question (ended by " **"), then the
    solver writes the step that answers it (ended by the newline). A chain ends when a step states the answer
    ("... So the answer is 18."). It ends without an answer when the decomposer writes no sub-question (an
    empty line, or one not ended by " **"), when the solver writes nothing, or after max_rounds rounds."""

    def __init__(self, n_rows, tokenizer, max_rounds):
        self.tokenizer, self.max_rounds = tokenizer, max_rounds
        self.lines, self.asked, self.tokens = [[] for _ in range(n_rows)], [None] * n_rows, [[] for _ in range(n_rows)]

    def turn(self, i, m, out):
        self.tokens[i] += out["tokens"]
        if m == 0:  # the decomposer's sub-question: the solver reads it as written, " **" included
            self.asked[i] = out["text"].strip()
            ended = self.tokenizer.decode(out["tokens"]).rstrip().endswith(SUB.strip())
            return [] if self.asked[i] and ended else None
        self.lines[i].append(socratic_line(self.asked[i], out["text"].strip()))
        done = states_answer(out["text"]) or not out["tokens"] or len(self.lines[i]) == self.max_rounds
        return None if done else []

    def chains(self):
        """-> per row {"text": the chain as a unified model writes it, "tokens": both models' generated ids}."""
        return [{"text": " " + "\n".join(lines), "tokens": t} for lines, t in zip(self.lines, self.tokens)]


@torch.no_grad()
def socratic_chains(decomposer, solver, tokenizer, queries, cfg, max_rounds=10, batches=None, on_batch=None):
    """Socratic CoT with two models (Shridhar et al. 2022): cfg.n chains a query, each a dialogue in which the
    decomposer asks the next sub-question and the solver answers it (Socratic). A batch of cfg.batch_size
    queries (x n rows) runs all its rounds in one pair of caches (sample.generate_turns: each model prefills
    only the other's last turn), and samples from seed (cfg.seed, batch k) as generate() does.
    -> per query, cfg.n dicts {"text", "tokens"}; batches and on_batch(indices, outs) as generate()'s."""
    ask = replace(cfg, n=1, stop=(SUB.strip(), "\n"), max_new_tokens=48)
    solve = replace(cfg, n=1, stop=("\n",))
    results = [None] * len(queries)
    layout = batch_slices(len(queries), cfg.batch_size)
    for k in range(len(layout)) if batches is None else batches:
        batch = layout[k]
        prompts = [tokenizer.encode(queries[q]).ids for q in batch for _ in range(cfg.n)]
        seeds = [replace(c, seed=batch_seed(cfg.seed, k) * 2 + m) for m, c in enumerate((ask, solve))]
        # cache slots: the prompt, then a round's turns (each model's cache holds both: what it wrote, what it read)
        slots = max(map(len, prompts)) + max_rounds * (ask.max_new_tokens + solve.max_new_tokens + 1)
        dialogue = Socratic(len(prompts), tokenizer, max_rounds)
        generate_turns([decomposer, solver], tokenizer, prompts, seeds, dialogue.turn, slots,
                       eos_id=solver.cfg.eos_token_id, pad_id=solver.cfg.pad_token_id)
        chains = dialogue.chains()
        for j, q in enumerate(batch):
            results[q] = chains[j * cfg.n:(j + 1) * cfg.n]
        if on_batch:
            on_batch(list(batch), [results[q] for q in batch])
    return results


def answers_of(mode, outs, records):
    """Per question, the answer each chain commits to (data.gold's kind: a choice index or a number; None = abstained)."""
    return [[extract_answer(mode, c["text"], r.get("choices")) for c in o] for o, r in zip(outs, records)]
