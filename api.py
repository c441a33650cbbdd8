"""A client for OpenAI-compatible servers: how teacher.py --api asks a served teacher for chains.

SCoTD's teacher was a 175B model behind an API: the authors called the completions endpoint with `n`,
`temperature`, `stop` and `logprobs` and kept 30 chains a question. Any server with those routes can be the
teacher here: a hosted API, vLLM or SGLang serving a model across GPUs, or llama.cpp's server. This module
sends one request and copes with what comes back; teacher.py decides what to ask.

A request asks for `n` chains of one prompt, on /v1/completions (the few-shot text) or /v1/chat/completions
(the same worked examples as user and assistant turns: `chat_messages`). Each choice becomes a chain
{"text", "tokens", "logprob"}: its text cut after the first match of a `stop_after` pattern (the answer
sentence; the server has already cut at the `stop` strings), and, when the server returned log-probabilities,
the tokens kept and the sum of their log-probabilities. llama.cpp returns them under `logprobs.content[]`,
OpenAI's legacy completions under `logprobs.tokens` / `token_logprobs`: both are read. `Client.prompt_logprobs`
asks instead how the model reads given token ids (vLLM's `prompt_logprobs`: scoring a corpus, grading a student's
chains on-policy); a server that returns none is refused, naming what it lacks.

Faults, and how each ends (`Client.complete`):
    the connection refused or reset, a timeout, HTTP 429 or 5xx, a 200 whose body is not a completion:
        retried up to `max_retries` times, waiting `retry_wait` seconds, doubled each time (at most 60) with
        jitter, or as long as the server's Retry-After says; then ApiError naming the request.
    any other HTTP status (a wrong model name or key, a prompt over the context): ApiError at once, with the
        server's own message.
The API key travels in the Authorization header only, and is replaced by *** in every message this module
writes. httpx is imported only when a Client is made, so the local teacher path does not need it.
"""

import json
import queue
import random
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit, urlunsplit

from fileio import InputError

RETRYABLE = {408, 409, 425, 429}  # and every 5xx
MAX_WAIT = 60.0  # seconds: the longest backoff between two attempts (a Retry-After may ask for more)


class ApiError(InputError):
    """A request that failed for good; the message names the request and holds no secret."""


class Malformed(ValueError):
    """A 200 response that is not a completion (not JSON, no choices, a choice without text)."""


def base_url(url):
    """The server's base URL as the openai SDK takes it: "http://host:8080" gets "/v1"; credentials in the
    URL are refused (the URL is a command-line argument, visible to every user of the machine)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL such as http://127.0.0.1:8080/v1, got {url!r}")
    if parts.username or parts.password:
        raise ValueError("the URL holds credentials; put the key in an environment variable (--api-key-env) instead")
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def chat_messages(shots, pieces, system=None):
    """The few-shot prompt as chat messages: each worked example a user turn (its query) and an assistant
    turn (its answer), then the dialogue so far, `pieces` alternating user and assistant (the question; for
    Socratic rounds, each question the teacher wrote and the step that follows it). A custom header has no
    examples to split: it is the system message."""
    messages = [{"role": "system", "content": system}] if system else []
    for query, answer in shots:
        messages += [{"role": "user", "content": query.strip()}, {"role": "assistant", "content": answer.strip()}]
    messages += [{"role": "user" if k % 2 == 0 else "assistant", "content": p.strip()} for k, p in enumerate(pieces)]
    return messages


def token_logprobs(logprobs):
    """A choice's `logprobs` -> [(token bytes, log-probability), ...], or None when the server sent none.
    llama.cpp and chat: {"content": [{"token", "bytes", "logprob"}, ...]}; OpenAI's legacy completions:
    {"tokens": [...], "token_logprobs": [...]}."""
    if not isinstance(logprobs, dict):
        return None
    if isinstance(logprobs.get("content"), list):
        entries = [(t.get("bytes"), t.get("token"), t.get("logprob"))
                   for t in logprobs["content"] if isinstance(t, dict)]
    elif isinstance(logprobs.get("tokens"), list) and isinstance(logprobs.get("token_logprobs"), list):
        entries = [(None, t, lp) for t, lp in zip(logprobs["tokens"], logprobs["token_logprobs"])]
    else:
        return None
    out = []
    for raw, token, lp in entries:
        if not isinstance(lp, (int, float)) or not (isinstance(raw, list) or isinstance(token, str)):
            raise Malformed("a logprobs entry without its token or log-probability")
        out.append((bytes(raw) if isinstance(raw, list) else token.encode("utf-8"), float(lp)))
    return out


def parse_response(raw, style):
    """A response body -> ([{"text", "logprobs"}, ...], usage dict); Malformed when it is not a completion."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Malformed(f"the body is not JSON ({e})") from None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        raise Malformed("the body has no 'choices'")
    out = []
    for c in choices:
        message = c.get("message") if isinstance(c, dict) else None
        text = c.get("text") if style == "completions" and isinstance(c, dict) else \
            message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise Malformed(f"a choice without its {'text' if style == 'completions' else 'message content'}")
        out.append({"text": text, "logprobs": token_logprobs(c.get("logprobs"))})
    usage = body.get("usage")
    return out, usage if isinstance(usage, dict) else {}


def parse_prompt_logprobs(raw, n):
    """A response to Client.prompt_logprobs -> (rows, usage): rows None when the server sent no prompt_logprobs,
    else per prompt position None (the first) or {token id: (log-probability, decoded text or None)}. vLLM puts
    them on the choice ({"123": {"logprob", "rank", "decoded_token"}, ...} a position); a bare log-probability is
    read too."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Malformed(f"the body is not JSON ({e})") from None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Malformed("the body has no 'choices'")
    found = choices[0].get("prompt_logprobs", body.get("prompt_logprobs"))
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    if found is None:
        return None, usage
    if not isinstance(found, list) or len(found) != n:
        got = len(found) if isinstance(found, list) else "no"
        raise Malformed(f"prompt_logprobs for {got} positions, the prompt has {n}")
    rows = [None]
    for entry in found[1:]:
        if not isinstance(entry, dict) or not entry:
            raise Malformed("a prompt position without its log-probabilities")
        row = {}
        for token, v in entry.items():
            lp, text = (v.get("logprob"), v.get("decoded_token")) if isinstance(v, dict) else (v, None)
            if not str(token).lstrip("-").isdigit() or not isinstance(lp, (int, float)):
                raise Malformed(f"a prompt_logprobs entry that is not token id -> log-probability: {token!r}")
            row[int(token)] = (float(lp), text)
        rows.append(row)
    return rows, usage


def chain(choice, stop_after=()):
    """A choice -> a chain {"text", "tokens", "logprob"}: the text cut just after the first match of a
    stop_after pattern; its tokens (their bytes) and the sum of their log-probabilities (None when the server
    sent none). Cut here: the tokens up to the one that completes the cut. Else every token the server
    reports, as sample.py keeps them: with llama.cpp, the one that completed its stop string too."""
    text = choice["text"]
    ends = [m.end() for m in (re.search(p, text) for p in stop_after) if m]
    text = text[:min(ends)] if ends else text
    if choice["logprobs"] is None:
        return {"text": text, "tokens": None, "logprob": None}
    kept, need, seen = choice["logprobs"], len(text.encode("utf-8")), 0
    if ends:
        for k, (raw, _) in enumerate(choice["logprobs"]):
            seen += len(raw)
            if seen >= need:
                kept = choice["logprobs"][:k + 1]
                break
    return {"text": text, "tokens": [raw for raw, _ in kept], "logprob": sum(lp for _, lp in kept)}


@dataclass
class Tally:
    """What a run cost: requests sent (retries included), retries, bodies that were not completions, prompt
    tokens (the server's usage) and completion tokens (counted from the log-probabilities, which name every
    token of every choice; else the server's usage -- llama.cpp's counts one choice when n > 1)."""
    requests: int = 0
    retries: int = 0
    malformed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Client:
    """POSTs to one OpenAI-compatible server, retrying what can be retried; thread-safe (one connection pool,
    the tally under a lock). `params`: what every request carries besides the prompt, n and seed
    (temperature, top_p, max_tokens, stop, logprobs)."""

    def __init__(self, url, model, style="completions", key=None, timeout=600.0, max_retries=8, retry_wait=1.0,
                 params=None):
        import httpx  # only the API path needs it

        self.httpx, self.style, self.model, self.key = httpx, style, model, key
        self.url = base_url(url) + ("/completions" if style == "completions" else "/chat/completions")
        self.max_retries, self.retry_wait, self.params = max_retries, retry_wait, dict(params or {})
        self.http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else {})
        self.tally, self.lock = Tally(), threading.Lock()

    def count(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self.tally, k, getattr(self.tally, k) + v)

    def totals(self):
        with self.lock:
            return asdict(self.tally)

    def secret_free(self, text):
        return text.replace(self.key, "***") if self.key else text

    def complete(self, prompt, n, seed=None, what="a request"):
        """`prompt` (text, or chat messages) -> up to n choices [{"text", "logprobs"}] (a server may return
        fewer). Retries as the module docstring says; ApiError names `what` when it gives up."""
        body = {"model": self.model, ("prompt" if self.style == "completions" else "messages"): prompt, "n": n}
        body |= self.params | ({"seed": seed} if seed is not None else {})
        choices, usage = self.post(body, lambda raw: parse_response(raw, self.style), what)
        self.account(choices, usage)
        return choices

    def prompt_logprobs(self, ids, k, what="a request"):
        """How the served model reads a prompt of token ids: for each position after the first, the log-probability
        of the token there and of the model's k likeliest there -> [None, {token id: (log-probability, decoded
        text)}, ...] (vLLM's `prompt_logprobs`, asked of its completions endpoint with one token to generate).
        A server that returns none (llama.cpp, OpenAI) cannot score given tokens: ApiError saying so."""
        body = {"model": self.model, "prompt": list(map(int, ids)), "max_tokens": 1, "temperature": 0.0, "n": 1,
                "prompt_logprobs": k}
        rows, usage = self.post(body, lambda raw: parse_prompt_logprobs(raw, len(ids)), what)
        if rows is None:
            raise ApiError(f"{what}: {self.url} returned no prompt log-probabilities: the server lacks vLLM's "
                           "`prompt_logprobs` (its completions endpoint has it; llama.cpp's and OpenAI's do not), so "
                           "it cannot grade tokens it did not write; use a local teacher or a vLLM server")
        self.count(prompt_tokens=int(usage.get("prompt_tokens") or len(ids)))
        return rows

    def post(self, body, parse, what):
        """POST body -> parse(the 200 response's bytes); Malformed bodies, transport faults, 429 and 5xx retried."""
        for attempt in range(self.max_retries + 1):
            wait, why = None, None
            self.count(requests=1, retries=int(attempt > 0))
            try:
                r = self.http.post(self.url, json=body)
            except self.httpx.TransportError as e:  # refused, reset, timed out, cut off
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if r.status_code == 200:
                    try:
                        return parse(r.content)
                    except Malformed as e:
                        self.count(malformed=1)
                        why = f"a malformed response: {e}"
                elif r.status_code in RETRYABLE or r.status_code >= 500:
                    why, wait = f"HTTP {r.status_code}: {server_message(r)}", retry_after(r.headers.get("retry-after"))
                else:
                    said = f"{what}: {self.url} answered HTTP {r.status_code}: {server_message(r)}"
                    raise ApiError(self.secret_free(said))
            if attempt == self.max_retries:
                raise ApiError(self.secret_free(f"{what}: {self.url}: gave up after {attempt + 1} attempts; "
                                                f"the last: {why}"))
            time.sleep(wait if wait is not None else backoff(self.retry_wait, attempt))

    def account(self, choices, usage):
        counted = [c["logprobs"] for c in choices]
        completion = sum(map(len, counted)) if all(c is not None for c in counted) else \
            usage.get("completion_tokens", 0)
        self.count(prompt_tokens=int(usage.get("prompt_tokens") or 0), completion_tokens=int(completion or 0))

    def close(self):
        self.http.close()


def backoff(first, attempt):
    """Seconds before retry `attempt` + 1: `first` doubled each attempt, at most MAX_WAIT, with jitter (a
    uniform draw from its upper half, so that clients refused together do not return together)."""
    wait = min(MAX_WAIT, first * 2 ** attempt)
    return wait / 2 + random.uniform(0, wait / 2)


def retry_after(value):
    """A Retry-After header (seconds, or an HTTP date) -> seconds to wait, or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def server_message(r):
    """The server's own words for an error: OpenAI's {"error": {"message"}}, else the body, on one line."""
    try:
        body = r.json()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("error") or body
    except (ValueError, AttributeError, KeyError, TypeError):
        message = r.text
    return " ".join(str(message).split())[:500] or "(no message)"


def in_order(work, jobs, concurrency):
    """work(job) for each job on `concurrency` threads -> yields (job, result) in the jobs' order, each as soon
    as it and every job before it are done; an exception from work(job) is raised in its place (no job starts
    after it, the jobs in flight before it are finished and yielded first). The threads
    are daemons: Ctrl-C ends the run at once, without waiting for the requests in flight."""
    jobs = list(jobs)
    todo, done, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    for k in range(len(jobs)):
        todo.put(k)

    def worker():
        while not stop.is_set():
            try:
                k = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((k, work(jobs[k]), None))
            except BaseException as e:  # noqa: B036 -- handed to the main thread, which raises it
                stop.set()  # no new jobs: the run ends once the jobs before this one are written
                done.put((k, None, e))

    # A Ctrl-C or SIGTERM sent to the process may be handed to any thread that does not block it, and only the
    # main thread runs Python's handlers: one taken by a worker stuck in a request would wait for that request.
    # So the workers start with both blocked (a thread inherits its creator's mask).
    masked = hasattr(signal, "pthread_sigmask")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if masked else None
    try:
        for _ in range(min(concurrency, len(jobs))):
            threading.Thread(target=worker, daemon=True).start()
    finally:
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    ready = {}
    try:
        for k, job in enumerate(jobs):
            while k not in ready:
                j, result, error = done.get()
                ready[j] = (result, error)
            result, error = ready.pop(k)
            if error is not None:
                raise error
            yield job, result
    finally:
        stop.set()
