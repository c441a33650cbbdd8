"""On-policy distillation (train.py --on-policy): the student writes the chains, a teacher grades every token.

GKD (Agarwal et al. 2024) and the 2026 recipes train the student on its own samples: each step it writes
--on-policy-n chains for each of its questions, and the loss at each chain token is a divergence between the
student's next-token distribution and the teacher's at the same place -- exact over the vocabulary for a local
teacher (losses.Grader: GKD's generalised JSD, --beta 1 the reverse KL), the sampled-token estimator of the reverse
KL for a served one (losses.SampledTokens). --on-policy-mix trains a share of the steps on corpus batches (the SCoTD
loss) instead. train.py enters here through three calls: `load` (the teacher and the question stream), `takes`
(does this step sample?) and `step_batches` (the step's micro-batches, graded).
"""

import math
import os
import time
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import api
import cli
import data
import distill
import losses
import xtok
from checkpoint import from_pretrained, load_tokenizer
from answers import answers_of
from distributed import rank_share
from distill import served_logprobs
from fileio import InputError
from model import DTYPES
from sample import KVCache, SampleConfig, generate, prefill
from scotd import ANSWER_END, format_query


class CrossTeacher(NamedTuple):
    """A local teacher of another tokenizer (xtok.py): the model, its tokenizer, the projection of its vocabulary onto
    the student's, and the student's pieces' bytes."""
    model: object
    tokenizer: object
    projection: xtok.Projection
    student_pieces: list


class OnPolicy:
    """The two halves of an on-policy step besides the update. `sample`: the current student writes n chains for
    each of a micro-batch's questions (sample.generate with `sampling`'s n, temperature, token budget and compile --
    its compiled decode step, replayed as CUDA graphs on CUDA, the weights updated in place between steps -- stopping
    as evaluate.py's chains do); the prompt is the question's training query, so each chain is an example (query +
    chain, n_query) whose chain tokens carry the loss. `grade`: the teacher's view of those tokens -- a local
    teacher's hidden states at them (losses.Grader: the divergence is exact over the vocabulary), or a served
    teacher's log-probability of each (losses.SampledTokens; api.Client.prompt_logprobs, `concurrency` requests in
    flight). `header`: the text the teacher reads before every row, in its own tokens (train.py --teacher-shots: worked
    examples in the chains' format, where they end included), the student never; a local teacher reads it once
    (sample.prefill) and every row attends to that cache. `records`: the training questions `step_batches` draws
    from."""

    concurrency = 4  # a served teacher's requests in flight

    def __init__(self, tokenizer, mode, sampling, beta=1.0, header="", teacher=None, client=None, records=()):
        self.tokenizer, self.mode, self.sampling, self.beta = tokenizer, mode, sampling, beta
        self.teacher, self.client, self.records = teacher, client, records
        teacher_tokenizer = teacher.tokenizer if isinstance(teacher, CrossTeacher) else tokenizer
        self.header = teacher_tokenizer.encode(header, add_special_tokens=False).ids if header else []  # teacher ids
        self.header_cache = None  # a local teacher's cache of the header (prefilled at the first grade: it is frozen)
        self.stream = None  # the questions (`questions`), from the resumed position at the first step
        self.queries = []  # the query text of each example the last `sample` returned (grade_across reads them)

    def sample(self, model, records, seed):
        """-> (examples [(ids, n_query)] of the chains with at least one token, stats: sampled tokens a chain and the
        share of chains whose answer is the gold one)."""
        prompts = [self.tokenizer.encode(format_query(r["question"], r.get("choices"))).ids for r in records]
        cfg = replace(self.sampling, stop_after=(ANSWER_END,) if self.mode == "cot" else (),  # where teacher.py cut
                      batch_size=max(1, len(prompts)), seed=seed)                              # its chains
        was_training = model.training
        model.eval()
        outs = generate(model, self.tokenizer, prompts, cfg.for_model(model))
        model.train(was_training)
        right = [a == data.gold(r) for answers, r in zip(answers_of(self.mode, outs, records), records)
                 for a in answers]
        chains = [(p, c, r) for p, o, r in zip(prompts, outs, records) for c in o]
        examples = [(np.array(p + g, dtype=np.int32), len(p)) for p, c, _ in chains if (g := self.graded(c))]
        self.queries = [format_query(r["question"], r.get("choices")) for _, c, r in chains if self.graded(c)]
        stats = {"sampled_tokens": float(np.mean([len(c["tokens"]) for _, c, _ in chains])) if chains else 0.0,
                 "right": float(np.mean(right)) if right else 0.0}
        return examples, stats

    def graded(self, chain):
        """A sampled chain's tokens the teacher grades: those inside its text. The token that completes a stop and
        runs past the text (".\n\n" after the answer sentence) is the format's end, which the teacher never chose --
        its own chains were cut by a rule (teacher.py) -- so it gives that token little mass (Qwen2.5-Coder-1.5B:
        1 % at the slice's chain ends, experiments/README.md) and grading it would teach the student not to stop."""
        tokens = chain["tokens"]
        while tokens and len(self.tokenizer.decode(tokens, skip_special_tokens=False)) > len(chain["text"]):
            tokens = tokens[:-1]
        return tokens

    def grade(self, idx, target_idx, examples, device):
        """The teacher at the target positions of rows built from `examples` (idx (B, T) on the device)."""
        if isinstance(self.teacher, CrossTeacher):
            return self.grade_across(examples, device)
        if self.teacher is not None:
            hidden = self.teacher.hidden_at(idx, target_idx, self.after_header(self.teacher, *idx.shape))
            return losses.Grader(hidden, self.teacher.lm_head.weight, self.teacher.cfg.logit_softcap, self.beta)

        def chain(job):
            e, (ids, n_query) = job
            rows = self.client.prompt_logprobs(self.header + ids.tolist(), 1, f"on-policy chain {e + 1} of the step")
            return served_logprobs(rows[len(self.header) + n_query:], ids[n_query:].tolist(), self.tokenizer,
                                   f"on-policy chain {e + 1}", "the student's tokenizer")
        logps = [lp for _, lp in api.in_order(chain, list(enumerate(examples)), self.concurrency)]
        graded = np.concatenate(logps) if logps else np.zeros(0, np.float32)
        return losses.SampledTokens(torch.from_numpy(graded).to(device))

    @torch.no_grad()
    def grade_across(self, examples, device):
        """A teacher of another tokenizer: each chain's text (its graded tokens' bytes) read in the teacher's tokens
        after the question, the teacher's distribution where a student token starts at the byte a teacher token
        starts, carried onto the student's vocabulary (xtok.Projection.full) -> losses.ProjectedGrades over the
        examples' chain tokens in order (the rows' flat target positions)."""
        rows, where = self.align(examples)
        aligned = [w is not None for w in where]
        model = self.teacher.model
        width = max(map(len, rows))
        idx = torch.full((len(rows), width), model.cfg.pad_token_id, dtype=torch.long)
        for r, row in enumerate(rows):
            idx[r, :len(row)] = torch.tensor(row)
        flat = torch.tensor([r * width + p for r, p in (w for w in where if w is not None)], dtype=torch.long)
        vocab = self.teacher.projection.student_vocab
        logprobs = torch.full((len(where), vocab), -math.log(vocab))  # not aligned: uniform, never read
        if len(flat):
            hidden = model.hidden_at(idx.to(device), flat.to(device), self.after_header(model, *idx.shape))
            teacher = losses.capped(F.linear(hidden, model.lm_head.weight), model.cfg.logit_softcap).float()
            logprobs[torch.tensor(aligned)] = self.teacher.projection.full(teacher.log_softmax(-1)).cpu()
        return losses.ProjectedGrades(logprobs.to(device), torch.tensor(aligned, device=device), self.beta)

    def align(self, examples):
        """Each chain's text read in the teacher's tokens after the question -> (the teacher's rows of token ids, and
        per chain token in order: (its row, the teacher position that predicts it) where aligned, else None)."""
        cross = self.teacher
        rows, where = [], []
        for e, ((ids, n_query), query) in enumerate(zip(examples, self.queries)):
            chain = [int(t) for t in ids[n_query:]]
            spelled = [cross.student_pieces[t] or b"" for t in chain]
            ours = np.cumsum([0] + [len(b) for b in spelled])
            spelled_text = b"".join(spelled)
            text = spelled_text.decode("utf-8", errors="replace")
            theirs = cross.tokenizer.encode(text, add_special_tokens=False)
            at_byte = np.cumsum([0] + [len(ch.encode()) for ch in text])
            t_offsets = [(int(at_byte[a]), int(at_byte[b])) for a, b in theirs.offsets]
            head = cross.tokenizer.encode(query).ids  # (after the header, read once: after_header)
            rows.append(head + theirs.ids)
            pairs = dict(xtok.starts(spelled_text, t_offsets, list(zip(ours[:-1], ours[1:]))))
            where += [(e, len(head) + pairs[i] - 1) if i in pairs else None for i in range(len(chain))]
        return rows, where

    def after_header(self, model, rows, width):
        """An empty cache of `rows` rows and `width` slots that continue the teacher's header (None without one)."""
        if not self.header:
            return None
        if self.header_cache is None:
            self.header_cache = prefill(model, self.header)
        p = next(model.parameters())
        return KVCache(model.cfg, rows, width, device=p.device, dtype=p.dtype, shared=self.header_cache)

    def step_batches(self, trainer, step):
        """The micro-batches of on-policy step `step`: each rank's share of the next questions, the student's chains
        for them (sampled with a seed of the step, the micro-batch and the rank: a resumed run samples the same), the
        teacher's grades -> (the micro-batches, the stream's position after it, the step's stats and the seconds
        sampling and grading took)."""
        run, dist, model, device = trainer.run, trainer.dist, trainer.raw_model, trainer.device
        if self.stream is None:
            self.stream = questions(self.records, run, trainer.state.on_epoch, trainer.state.on_index)
        plain = replace(run, shared=False, pack=False, kd=None)  # causal rows: the teacher reads them as they are
        batches, stats, seconds = [], [], {"sample_s": 0.0, "teacher_s": 0.0}
        for micro in range(run.grad_accum):
            epoch, index, batch = next(self.stream)
            t0 = time.perf_counter()
            seed = int(np.random.SeedSequence([run.seed, step, micro, dist.rank]).generate_state(1)[0])
            examples, sampled = self.sample(model, rank_share(batch, dist, True), seed)
            t1 = time.perf_counter()
            rows = data.to_tensors(examples, plain, model.cfg.pad_token_id, device)
            batches.append(rows._replace(teacher_view=self.grade(rows.idx, rows.target_idx, examples, device)))
            cli.synchronize(device)  # the grade runs asynchronously on CUDA: its time is its own, not the update's
            seconds["sample_s"] += t1 - t0
            seconds["teacher_s"] += time.perf_counter() - t1
            stats.append(sampled)
        means = {k: dist.sum(sum(s[k] for s in stats)) / (len(stats) * dist.world) for k in stats[0]}
        return batches, {"on_epoch": epoch, "on_index": index}, means | seconds


def takes(run, step):
    """Does optimizer step `step` (0-based) sample from the student? All but a --on-policy-mix share, drawn from a
    generator of (seed, step): a resumed run decides the same."""
    return np.random.default_rng([run.seed, step, 2]).random() >= run.on_policy_mix


def questions(records, run, start_epoch, start_index):
    """On-policy micro-batches: endless (epoch, index, questions), --batch-size / --on-policy-n questions each, from a
    permutation of the training questions per (seed, epoch) -- a pure function of them, so a resumed run sees the
    same; a batch may run on into the next epoch. index counts the questions of epoch consumed."""
    per, epoch, index = max(1, run.batch_size // run.on_policy_n), start_epoch, start_index
    order = np.random.default_rng([run.seed, epoch, 1]).permutation(len(records))
    while True:
        batch = []
        while len(batch) < per:
            if index == len(order):
                epoch, index = epoch + 1, 0
                order = np.random.default_rng([run.seed, epoch, 1]).permutation(len(records))
            batch.append(records[order[index]])
            index += 1
        yield epoch, index, batch


def load(run, tokenizer, init, device, dist, records):
    """--on-policy's OnPolicy over the training questions `records`: the local teacher, loaded for inference (bf16 on
    CUDA, else fp32) once its tokenizer is checked against the student's; or the served teacher's client. With
    --teacher-shots, the worked examples the teacher reads before each question (of the task of `records`)."""
    teacher, client = None, None
    if run.teacher:
        teacher_tokenizer = load_tokenizer(run.teacher)
        teacher = from_pretrained(run.teacher, device=device, dtype=DTYPES[cli.default_dtype(device)])
        teacher.eval().requires_grad_(False)
        if distill.tokenizer_fingerprint(teacher_tokenizer) != distill.tokenizer_fingerprint(tokenizer):
            teacher = across(run, teacher, teacher_tokenizer, tokenizer)
    else:
        key = os.environ.get(run.api_key_env or "OPENAI_API_KEY") or None
        client = api.Client(run.teacher_api, run.teacher_model, key=key)
    per = max(1, run.batch_size // run.on_policy_n)
    if per % dist.world:
        raise InputError(f"--on-policy: {per} questions a micro-batch (--batch-size {run.batch_size} / --on-policy-n "
                         f"{run.on_policy_n}) do not split over {dist.world} ranks")
    bare = f"--teacher-shots {run.teacher_shots} needs them; --teacher-shots 0: the teacher grades after the bare " \
        "question"
    shots = data.exemplars(run.teacher_shots, data.train_corpus_of(records, bare)) if run.teacher_shots else []
    header = data.fewshot_header(shots) if shots else ""
    sampling = SampleConfig(n=run.on_policy_n, temperature=run.temperature, max_new_tokens=run.max_new_tokens,
                            compile=run.compile and device.type == "cuda")
    return OnPolicy(tokenizer, run.mode, sampling, run.beta, header, teacher, client, records)


def across(run, teacher, teacher_tokenizer, tokenizer):
    """A local teacher of another tokenizer, aligned to the student's (xtok.py), said in one line; --beta 1 refused."""
    if run.beta == 1:
        raise InputError(f"--teacher {run.teacher}: its tokenizer is not the student's, and --beta 1 (the reverse KL) "
                         "is unbounded where the teacher, carried onto the student's pieces, gives one no mass: use "
                         "--beta below 1 (0.5: the Jensen-Shannon divergence; 0: the forward KL)")
    projection = xtok.Projection(teacher_tokenizer, tokenizer)
    print(f"note      --teacher {run.teacher}: its tokenizer is not the student's: aligning two tokenizers "
          f"({projection.teacher_vocab:,} teacher pieces -> {projection.student_vocab:,} student pieces; the student "
          f"holds {projection.matched:.1%} of the teacher's byte for byte)", flush=True)
    return CrossTeacher(teacher, teacher_tokenizer, projection, xtok.piece_bytes(tokenizer))


def describe(run):
    """The run's on-policy line (train.describe)."""
    per = max(1, run.batch_size // run.on_policy_n)
    divergence = ("reverse KL" if run.beta == 1 else "forward KL" if run.beta == 0 else
                  f"generalised JSD, beta {run.beta}")
    return (f"on-policy {run.total_steps:,} steps x {run.grad_accum} x {per} questions x {run.on_policy_n} chains the "
            f"student samples (T={run.temperature}, <= {run.max_new_tokens} tokens), graded token by token by "
            f"{run.teacher or f'{run.teacher_model} at {run.teacher_api}'} ({divergence}"
            f"{', sampled tokens' if run.teacher_api else ''}"
            f"{f', {run.teacher_shots} worked examples before each question' if run.teacher_shots else ''}); "
            f"{run.on_policy_mix:.0%} of the steps on corpus batches")
