"""A real local HTTP server speaking the OpenAI chat-completions shape, for the review app's LLM judge.

No LLM is reachable from the tests, so this stands in for one: it answers POST /v1/chat/completions
with a judgement that prefers whichever of "Response 1" and "Response 2" contains ``marker``, or
fails the way a real endpoint can (HTTP 500, a timeout, an answer outside the schema).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from streams.embedded.process import free_port


class FakeJudge:
    """``mode``: "ok", "error" (HTTP 500), "slow" (answers after ``release`` is set or 30 s), "garbage"."""

    def __init__(self, mode: str = "ok", marker: str = "good answer", rationale: str = "Response {n} is right.") -> None:
        self.mode, self.marker, self.rationale = mode, marker, rationale
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, body: dict[str, Any]) -> str:
        user = body["messages"][-1]["content"]
        first, second = user.split("## Response 1\n", 1)[1].split("\n\n## Response 2\n", 1)
        n = "1" if self.marker in first else "2" if self.marker in second else "tie"
        return json.dumps({"verdict": n, "rationale": self.rationale.format(n=n)})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if fake.mode == "error" or self.path != "/v1/chat/completions":
                    self.send_response(500 if fake.mode == "error" else 404)
                    self.end_headers()
                    return
                if fake.mode == "slow":
                    fake.release.wait(30)
                content = "this is not JSON" if fake.mode == "garbage" else fake.answer(body)
                out = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                try:
                    self.wfile.write(out)
                except OSError:  # the client gave up (a timeout test)
                    pass

        return Handler

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
