"""A misbehaving OpenAI-compatible server for teacher.py --api's fault tests (stdlib http.server, 127.0.0.1).

Each request takes the next action of --script (comma-separated; once it runs out, "ok" for ever):
    ok            200 with the n choices asked for, each --text, with llama.cpp-style logprobs (a word a token, -0.5 each)
    fewer         200 with one choice, whatever n was asked
    429[:S]       429 with Retry-After: S (default 1)
    500           500 with an OpenAI-style error body
    drop          the connection closed without a response
    reset         the connection reset (RST)
    stall[:S]     nothing for S seconds (default 30), then the connection closed
    slow:S        S seconds, then ok
    malformed     200 whose body is not JSON
    nochoices     200, JSON without "choices"
    401           401 whose message echoes the Authorization header (what careless servers do)
    404           404 "model not found"
A request with `prompt_logprobs` (token ids as its prompt) is answered as vLLM's completions endpoint answers
it when --model names a model folder (scotd's model run on the ids: for each position after the first, the
prompt token and the k likeliest, {"<id>": {"logprob", "rank", "decoded_token"}}), and without them otherwise,
as llama.cpp does. Every request is logged to --log as a JSON line {"t", "action", "body", "auth"}. Prints one
line, `listening URL (pid PID)`, when it is ready.
"""

import argparse
import json
import os
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--script", default="")
    p.add_argument("--log", required=True)
    p.add_argument("--text", default=" Because it is. So the answer is (a) alpha. Alpha is first.")
    p.add_argument("--model", default=None, help="a model folder: answer prompt_logprobs as vLLM does")
    args = p.parse_args()
    script, lock = [a for a in args.script.split(",") if a], threading.Lock()
    graded = vllm_prompt_logprobs(args.model) if args.model else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def reply(self, status, body, headers=()):
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

        def completion(self, body, n):
            words = re.findall(r"\s*\S+", args.text)
            content = [{"token": w, "logprob": -0.5} for w in words]
            key = "message" if "messages" in body else "text"
            choice = lambda i: {"index": i, "finish_reason": "stop", "logprobs": {"content": content},  # noqa: E731
                                key: {"role": "assistant", "content": args.text} if key == "message" else args.text}
            return {"object": "text_completion", "choices": [choice(i) for i in range(n)],
                    "usage": {"prompt_tokens": 10, "completion_tokens": len(words)}}

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with lock:
                action = script.pop(0) if script else "ok"
                with open(args.log, "a") as f:
                    f.write(json.dumps({"t": time.time(), "action": action, "body": body,
                                        "auth": self.headers.get("Authorization")}) + "\n")
            name, _, arg = action.partition(":")
            if name == "ok" and "prompt_logprobs" in body:
                choice = {"index": 0, "text": " x", "finish_reason": "length"}
                if graded:
                    try:
                        with lock:
                            choice["prompt_logprobs"] = graded(body["prompt"], body["prompt_logprobs"])
                    except IndexError:  # as vLLM refuses a prompt with an id past its vocabulary
                        return self.reply(400, {"error": {"message": "Token id out of vocabulary"}})
                self.reply(200, {"object": "text_completion", "choices": [choice],
                                 "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 1}})
            elif name == "ok":
                self.reply(200, self.completion(body, body.get("n", 1)))
            elif name == "slow":
                time.sleep(float(arg))
                self.reply(200, self.completion(body, body.get("n", 1)))
            elif name == "fewer":
                self.reply(200, self.completion(body, 1))
            elif name == "429":
                self.reply(429, {"error": {"message": "rate limited"}}, [("Retry-After", arg or "1")])
            elif name == "500":
                self.reply(500, {"error": {"message": "internal error"}})
            elif name == "drop":
                self.close_connection = True
            elif name == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
            elif name == "stall":
                time.sleep(float(arg or 30))
                self.close_connection = True
            elif name == "malformed":
                self.reply(200, b'{"choices": [{"text": "cut off')
            elif name == "nochoices":
                self.reply(200, {"object": "text_completion"})
            elif name == "401":
                self.reply(401, {"error": {"message": f"invalid API key: {self.headers.get('Authorization')}"}})
            elif name == "404":
                self.reply(404, {"error": {"message": f"model '{body.get('model')}' not found"}})
            else:
                raise SystemExit(f"unknown action {action!r}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"listening http://127.0.0.1:{server.server_address[1]}/v1 (pid {os.getpid()})", flush=True)
    server.serve_forever()


def vllm_prompt_logprobs(folder):
    """ids, k -> vLLM's prompt_logprobs for them under the model in `folder` (fp32, one forward pass)."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from checkpoint import from_pretrained, load_tokenizer

    model, tokenizer = from_pretrained(folder), load_tokenizer(folder)

    def graded(ids, k):
        with torch.no_grad():
            logp = model(torch.tensor([ids]))[0][0].log_softmax(-1)
        rows = [None]
        for i in range(1, len(ids)):
            order = logp[i - 1].argsort(descending=True)
            rank = {int(t): r + 1 for r, t in enumerate(order[:k])}
            rank.setdefault(ids[i], int((logp[i - 1] > logp[i - 1, ids[i]]).sum()) + 1)
            rows.append({str(t): {"logprob": float(logp[i - 1, t]), "rank": r,
                                  "decoded_token": tokenizer.decode([t], skip_special_tokens=False)} for t, r in rank.items()})
        return rows
    return graded


if __name__ == "__main__":
    main()
