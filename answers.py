"""Answers as the method gets them from models, shared by evaluate.py, train.py's dev accuracy and teacher.py:
greedy answers (with the label-first fast path), the answers chains commit to (`answers_of`), and dialogues
between models -- Socratic CoT's decomposer and solver (Shridhar et al. 2022), or a teacher asking a sub-question
a step -- through one batch loop (`dialogues`). sample.py does the batched sampling itself; scotd.py reads the
answers out of the text.
"""

from dataclasses import replace

from sample import SampleConfig, batch_seed, batch_slices, generate, generate_turns
from scotd import LABEL_FIRST, STOP, SUB, extract_answer, kind_of, socratic_line, states_answer


GREEDY = SampleConfig(max_new_tokens=96, batch_size=16)  # greedy's defaults: 96 tokens, 16 questions a batch


def greedy(model, tokenizer, prompts, mode, cfg=GREEDY, batches=None, on_batch=None):
    """Greedy continuations (cfg: max_new_tokens, batch_size, seed, compile; the rest is greedy's). Label-first
    students ("post", "label") state the answer first: decoding stops after the answer sentence (the fast path
    Wadhwa et al. 2024 point to), not after the rationale."""
    fast = mode in LABEL_FIRST
    cfg = replace(cfg, n=1, temperature=0.0, max_new_tokens=min(24, cfg.max_new_tokens) if fast else cfg.max_new_tokens,
                  stop=(". ", STOP) if fast else (STOP,)).for_model(model)
    return generate(model, tokenizer, prompts, cfg, batches=batches, on_batch=on_batch)


def dialogues(models, tokenizer, items, make, cfgs, encode, batches=None, prefix=None):
    """The batch loop of a dialogue between models, shared by Socratic CoT's decomposer and solver (below) and
    teacher.py's teacher asking a sub-question a step: items in batches of cfgs[0].batch_size, cfgs[0].n dialogues
    (rows) an item, all turns of a batch in one pair of caches (sample.generate_turns: each model prefills only what
    it has not read). make(rows) -> the batch's dialogue: its `prompts` (text, one a row), `turn(i, out, m)` (the
    text that follows model m's output in row i, or None: the row is done), `slots(prompts)` (the cache slots a row
    needs) and `chains()` at the end. encode: text -> token ids. Model m of batch k samples from seed
    batch_seed(cfgs[0].seed, k) * len(models) + m, so any subset of `batches` gives what the whole run gives for
    them. Yields (the batch's item indices, per item its n chains)."""
    n, layout = cfgs[0].n, batch_slices(len(items), cfgs[0].batch_size)
    ends = dict(eos_id=models[-1].cfg.eos_token_id, pad_id=models[-1].cfg.pad_token_id)
    for k in range(len(layout)) if batches is None else batches:
        batch = list(layout[k])
        dialogue = make([items[i] for i in batch for _ in range(n)])
        prompts = [encode(p) for p in dialogue.prompts]
        seeded = [replace(c, n=1, seed=batch_seed(cfgs[0].seed, k) * len(models) + m, **ends)
                  for m, c in enumerate(cfgs)]

        def follow(i, m, out):  # generate_turns wants token ids: none for an empty follow-up
            text = dialogue.turn(i, out, m)
            return None if text is None else encode(text) if text else []
        generate_turns(models, tokenizer, prompts, seeded, follow, dialogue.slots(prompts), prefix=prefix)
        chains = dialogue.chains()
        yield batch, [chains[j * n:(j + 1) * n] for j in range(len(batch))]


class Socratic:
    """Socratic CoT's two-model dialogue (a query a row). Each round has two turns: first the decomposer writes a
    sub-question, ended by " **"; then the solver writes the step that answers it, ended by the newline. A chain
    ends when a step states the answer ("... So the answer is 18."). It ends without an answer when the
    decomposer writes no sub-question (an empty line, or one not ended by " **"), when the solver writes
    nothing, or after max_rounds rounds."""

    def __init__(self, queries, tokenizer, max_rounds, turn_tokens):
        self.prompts, self.tokenizer, self.max_rounds, self.turn_tokens = queries, tokenizer, max_rounds, turn_tokens
        n = len(queries)
        self.lines, self.asked, self.tokens = [[] for _ in range(n)], [None] * n, [[] for _ in range(n)]

    def slots(self, prompts):
        """The prompt, then a round's turns (each model's cache holds both: what it wrote, what it read)."""
        return max(map(len, prompts)) + self.max_rounds * (self.turn_tokens + 1)

    def turn(self, i, out, m):
        self.tokens[i] += out["tokens"]
        if m == 0:  # the decomposer's sub-question: the solver reads it as written, " **" included
            self.asked[i] = out["text"].strip()
            ended = self.tokenizer.decode(out["tokens"]).rstrip().endswith(SUB.strip())
            return "" if self.asked[i] and ended else None
        self.lines[i].append(socratic_line(self.asked[i], out["text"].strip()))
        done = states_answer(out["text"]) or not out["tokens"] or len(self.lines[i]) == self.max_rounds
        return None if done else ""

    def chains(self):
        """-> per row {"text": the chain as a unified model writes it, "tokens": both models' generated ids}."""
        return [{"text": " " + "\n".join(lines), "tokens": t} for lines, t in zip(self.lines, self.tokens)]


def socratic_chains(decomposer, solver, tokenizer, queries, cfg, max_rounds=10, batches=None):
    """Socratic CoT with two models (Shridhar et al. 2022): cfg.n chains a query, each a dialogue in which the
    decomposer asks the next sub-question and the solver answers it, cfg.batch_size queries (x n rows) at a
    time. Yields (the batch's query indices, per query cfg.n dicts {"text", "tokens"}), as `dialogues`."""
    ask, solve = replace(cfg, stop=(SUB.strip(), "\n"), max_new_tokens=48), replace(cfg, stop=("\n",))
    make = lambda rows: Socratic(rows, tokenizer, max_rounds, ask.max_new_tokens + solve.max_new_tokens)  # noqa: E731
    yield from dialogues([decomposer, solver], tokenizer, queries, make, [ask, solve],
                         lambda text: tokenizer.encode(text).ids, batches)


def answers_of(mode, outs, records):
    """Per question, the answer each chain commits to (data.gold's kind: a choice index or a number; None:
    abstained)."""
    return [[extract_answer(mode, c["text"], r.get("choices"), kind_of(r)) for c in o] for o, r in zip(outs, records)]
