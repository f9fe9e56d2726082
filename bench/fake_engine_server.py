"""A fake OpenAI-compatible engine for the host-overhead bench (``bench/host_overhead_fake.py``): every completion
is answered with ``--tokens`` tokens, at once or after ``--latency-ms`` (concurrent requests wait together, as a batch
on an engine does), so what a client measures against it is host time. It speaks just enough of vLLM's API for
evalhost's ``vllm`` backend to attach (``/health``, ``/version``, ``/v1/models``, ``/metrics`` with the requests in
flight) and keeps the distinct request bodies it got (``GET /bodies``). Binds 127.0.0.1.

    python bench/fake_engine_server.py --port P --tokens 256 [--latency-ms 250]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

MODEL_NAME = "fake-model"


def serve(port: int, tokens: int, latency_s: float = 0.0) -> None:
    """A minimal asyncio HTTP/1.1 server with keep-alive: /health, /version, /v1/models, /metrics (the requests in
    flight), POST /v1/completions (each prompt answered with ``tokens`` tokens, at once or after ``latency_s``
    seconds, concurrent requests waiting together as a batch on an engine does), GET /bodies (the distinct request
    bodies seen, without their prompts, with counts)."""
    text = "".join(f" w{i % 97}" for i in range(tokens))
    ids = [1000 + i % 97 for i in range(tokens)]
    bodies: dict[str, int] = {}
    running = 0

    def answer(code: int, body: bytes, ctype: str = "application/json") -> bytes:
        return (f"HTTP/1.1 {code} OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    def completions(req: dict) -> bytes:
        shape = {k: v for k, v in req.items() if k != "prompt"}
        shape["prompt"] = "list" if isinstance(req.get("prompt"), list) else "str"
        key = json.dumps(shape, sort_keys=True)
        bodies[key] = bodies.get(key, 0) + 1
        prompts = req["prompt"] if isinstance(req["prompt"], list) else [req["prompt"]]
        n = min(int(req.get("max_tokens") or tokens), tokens)
        choices = []
        for i, _ in enumerate(prompts):
            c = {"index": i, "text": text if n == tokens else "".join(f" w{j % 97}" for j in range(n)),
                 "logprobs": None, "finish_reason": "length", "stop_reason": None, "prompt_logprobs": None}
            if req.get("return_token_ids"):
                c["token_ids"] = ids[:n]
                c["prompt_token_ids"] = None
            if req.get("logprobs") is not None:
                c["logprobs"] = {"token_logprobs": [-0.5] * n, "tokens": [f"w{j}" for j in range(n)],
                                 "top_logprobs": [{f"w{j}": -0.5} for j in range(n)], "text_offset": list(range(n))}
            choices.append(c)
        out = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": req.get("model"),
               "choices": choices, "usage": {"prompt_tokens": 1, "total_tokens": n + 1, "completion_tokens": n}}
        return json.dumps(out).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal running
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if method == "POST" and path == "/v1/completions":
                    running += 1
                    try:
                        data = completions(json.loads(body))
                        if latency_s:
                            await asyncio.sleep(latency_s)
                    finally:
                        running -= 1
                    writer.write(answer(200, data))
                elif path == "/health":
                    writer.write(answer(200, b"", "text/plain"))
                elif path == "/version":
                    writer.write(answer(200, b'{"version": "fake-tokens"}'))
                elif path == "/v1/models":
                    writer.write(answer(200, json.dumps({"data": [{"id": MODEL_NAME, "max_model_len": 4096}]})
                                        .encode()))
                elif path == "/metrics":
                    writer.write(answer(200, f"vllm:num_requests_running {running}\n".encode(), "text/plain"))
                elif path == "/bodies":
                    writer.write(answer(200, json.dumps(bodies).encode()))
                else:
                    writer.write(answer(404, b"{}"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tokens: int, logdir: Path, latency_ms: float = 0.0) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    log = open(logdir / "fake-server.log", "ab")
    proc = subprocess.Popen([sys.executable, __file__, "--port", str(port), "--tokens", str(tokens),
                             "--latency-ms", str(latency_ms)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the fake server did not start")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    args = ap.parse_args()
    serve(args.port, args.tokens, args.latency_ms / 1000)
