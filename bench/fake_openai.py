#!/usr/bin/env python3
"""A scripted OpenAI-compatible streaming server for validating benchmark
clients: every chat completion waits --ttft-ms, then streams max_tokens
(or max_completion_tokens) one-token chunks --itl-ms apart, then a usage
chunk and [DONE]. It sleeps rather than computes, so what a client measures
is the script, not the machine.

    python3 bench/fake_openai.py --port 18500 --ttft-ms 300 --itl-ms 20
"""
import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=18500)
    ap.add_argument("--ttft-ms", type=float, default=300)
    ap.add_argument("--itl-ms", type=float, default=20)
    a = ap.parse_args()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            n = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            start = time.monotonic()

            def chunk(delta):
                c = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(c)}\n\n".encode())
                self.wfile.flush()

            chunk({"role": "assistant", "content": ""})
            for i in range(n):
                # Absolute deadlines, so sleep overshoot does not accumulate.
                due = start + (a.ttft_ms + i * a.itl_ms) / 1e3
                time.sleep(max(0.0, due - time.monotonic()))
                chunk({"content": f" w{i}"})
            usage = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fake", "choices": [],
                     "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()

    ThreadingHTTPServer(("127.0.0.1", a.port), H).serve_forever()


if __name__ == "__main__":
    main()
