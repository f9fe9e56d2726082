"""A tiny fake OpenAI-compatible server for plugin tests that need faults a real server cannot be made to show on
demand (dying mid-request, HTTP 500, hanging, malformed answers). Normal behaviour is best tested against a real
server. Start it from Python with :class:`evalhost.testing.FakeServer`, or as a process::

    python -m evalhost.testing_server --port P --state FILE [--die-on 1,2] [--fail-500-on 1,2] [--hang-on 1]
        [--short-on 1] [--exit-at-start] [--startup-delay S] [--require-key KEY]
        [--omit-index-on 2] [--repeat-index-on 2] [--index-out-of-range-on 2] [--bad-token-ids-on 2]
        [--drip-on 2 --drip-seconds S] [--latency S]

Endpoints: ``GET /health``, ``GET /metrics`` (``vllm:num_requests_running``: the completions requests in flight),
``GET /version``, ``GET /v1/models`` (one model, ``fake``), ``POST /v1/completions`` (text = "echo:" + the
prompt's first 12 characters, token_ids = their code points, choices in reverse order so that clients must order
them by ``index``). Completions requests are numbered across restarts through the ``--state`` file, so a fault can
hit exactly the N-th request even after the server was restarted. ``--latency S``: every completions answer waits
S seconds (a fixed engine time). Each completions request is logged with its start and end (epoch seconds) and the
first 12 hex digits of each prompt's SHA-256, so a test can tell which requests were in flight together.

``--die-on``: the process exits (code 9) on that request; ``--fail-500-on``: HTTP 500; ``--hang-on``: no answer
for an hour; ``--short-on``: one choice too few; ``--omit-index-on``: the choices carry no ``index``;
``--repeat-index-on``: two choices claim index 0; ``--index-out-of-range-on``: the last choice claims index n;
``--bad-token-ids-on``: ``token_ids`` is ``["x", null]``; ``--drip-on``: the answer's bytes are sent one at a time
spread over ``--drip-seconds`` (each read returns quickly; only a deadline for the whole request stops it);
``--exit-at-start``: exit 3 before listening, as a server that runs out of memory does; ``--require-key``: HTTP
401 unless ``Authorization: Bearer KEY``. It binds 127.0.0.1 unless ``--host`` says otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _numbers(text: str) -> set[int]:
    return {int(x) for x in text.split(",") if x.strip()} if text else set()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m evalhost.testing_server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--die-on", default="")
    ap.add_argument("--fail-500-on", default="")
    ap.add_argument("--hang-on", default="")
    ap.add_argument("--short-on", default="")
    ap.add_argument("--exit-at-start", action="store_true")
    ap.add_argument("--startup-delay", type=float, default=0.0)
    ap.add_argument("--require-key", default="")
    ap.add_argument("--omit-index-on", default="")
    ap.add_argument("--repeat-index-on", default="")
    ap.add_argument("--index-out-of-range-on", default="")
    ap.add_argument("--bad-token-ids-on", default="")
    ap.add_argument("--drip-on", default="")
    ap.add_argument("--drip-seconds", type=float, default=40.0)
    ap.add_argument("--latency", type=float, default=0.0)
    args = ap.parse_args(argv)
    omit_on, repeat_on, range_on, bad_ids_on, drip_on = (
        _numbers(args.omit_index_on), _numbers(args.repeat_index_on), _numbers(args.index_out_of_range_on),
        _numbers(args.bad_token_ids_on), _numbers(args.drip_on))
    die_on, fail_on, hang_on, short_on = (_numbers(args.die_on), _numbers(args.fail_500_on),
                                          _numbers(args.hang_on), _numbers(args.short_on))
    print(f"fake server pid {os.getpid()} starting on {args.host}:{args.port}", flush=True)
    if args.exit_at_start:
        print("fatal: simulated startup crash (CUDA out of memory)", flush=True)
        sys.exit(3)
    time.sleep(args.startup_delay)
    lock = threading.Lock()
    in_flight = [0]

    def next_number() -> int:
        with lock:
            try:
                with open(args.state) as fh:
                    n = int(fh.read() or 0)
            except FileNotFoundError:
                n = 0
            n += 1
            with open(args.state, "w") as fh:
                fh.write(str(n))
            return n

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            print("request:", fmt % a, flush=True)

        def _send(self, code: int, body: dict | str, ctype: str = "application/json", drip_s: float = 0.0) -> None:
            data = (json.dumps(body) if isinstance(body, dict) else body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not drip_s:
                self.wfile.write(data)
                return
            self.wfile.flush()
            for i in range(len(data)):
                try:
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                except OSError:  # the client gave up
                    print("drip: client went away", flush=True)
                    return
                time.sleep(drip_s / len(data))

        def do_GET(self):
            if self.path == "/health":
                self._send(200, "", "text/plain")
            elif self.path == "/metrics":
                self._send(200, f"vllm:num_requests_running {in_flight[0]}\nvllm:num_requests_waiting 0\n",
                           "text/plain")
            elif self.path == "/version":
                self._send(200, {"version": "fake-0"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path != "/v1/completions":
                self._send(404, {"error": "not found"})
                return
            if args.require_key and self.headers.get("Authorization") != f"Bearer {args.require_key}":
                self._send(401, {"error": "bad key"})
                return
            n = next_number()
            prompts = body.get("prompt")
            prompts = prompts if isinstance(prompts, list) else [prompts]
            digests = ",".join(hashlib.sha256(str(p).encode()).hexdigest()[:12] for p in prompts)
            print(f"completions request #{n} start {time.time():.6f} prompts {digests}", flush=True)
            with lock:
                in_flight[0] += 1
            try:
                answer = self._complete(n, body, prompts)
            finally:
                with lock:
                    in_flight[0] -= 1
                print(f"completions request #{n} end {time.time():.6f}", flush=True)  # before the client has it
            if answer is not None:
                self._send(*answer[:2], drip_s=answer[2])

        def _complete(self, n: int, body: dict, prompts: list) -> tuple[int, dict, float] | None:
            if n in die_on:
                print(f"simulated crash on request #{n}", flush=True)
                os._exit(9)
            if n in hang_on:
                print(f"simulated hang on request #{n}", flush=True)
                time.sleep(3600)
            if n in fail_on:
                return 500, {"error": f"simulated internal error on request #{n}"}, 0.0
            time.sleep(args.latency)
            choices = []
            for i, p in enumerate(prompts):
                text = "echo:" + str(p)[:12]
                choice = {"index": i, "text": text, "finish_reason": "stop"}
                if body.get("return_token_ids"):
                    choice["token_ids"] = [ord(c) for c in text]
                choices.append(choice)
            choices.reverse()  # out of order on purpose: clients must order by index
            if n in short_on:
                choices = choices[:-1]
            if n in omit_on:
                for c in choices:
                    del c["index"]
            if n in repeat_on and len(choices) > 1:
                for c in choices[:2]:
                    c["index"] = 0
            if n in range_on:
                choices[-1]["index"] = len(choices)
            if n in bad_ids_on:
                for c in choices:
                    c["token_ids"] = ["x", None]
            if n in drip_on:
                print(f"dripping the answer to request #{n} over {args.drip_seconds} s", flush=True)
            return 200, {"id": f"cmpl-{n}", "object": "text_completion", "model": body.get("model"),
                         "choices": choices}, args.drip_seconds if n in drip_on else 0.0

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
