"""A local stand-in for Hugging Face's hosted FLUX.2 text encoder, speaking its protocol on 127.0.0.1.

`POST /predict` with `{"prompt": "..."}` and `Authorization: Bearer <token>` answers the `torch.save`d embeddings of
that prompt, computed by a real (tiny) FLUX.2 [dev] pipeline's `encode_prompt`, as the hosted endpoint computes them
with the real Mistral 3. A wrong token gets 401, and `answer_html` makes it answer as a moved endpoint does.
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class LocalTextEncoder:
    """The endpoint, serving `pipeline.encode_prompt` to requests bearing `token`; it records what it was asked."""

    def __init__(self, pipeline, token: str) -> None:
        self.pipeline, self.token = pipeline, token
        self.prompts: list[str] = []
        self.authorizations: list[str] = []
        self.answer_html = False
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}/predict"

    def __enter__(self) -> LocalTextEncoder:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def embeddings(self, prompt: str) -> torch.Tensor:
        with self.lock, torch.no_grad():
            embeds, _ = self.pipeline.encode_prompt(prompt=[prompt], device=torch.device("cpu"))
        return embeds.to(torch.bfloat16)  # the hosted endpoint answers in bfloat16

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                authorization = self.headers.get("Authorization", "")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.authorizations.append(authorization)
                if self.path != "/predict" or authorization != f"Bearer {endpoint.token}":
                    return self._answer(401, b"Unauthorized", "text/plain")
                if endpoint.answer_html:
                    return self._answer(200, b"<html>This endpoint has moved.</html>", "text/html")
                endpoint.prompts.append(body["prompt"])
                buffer = io.BytesIO()
                torch.save(endpoint.embeddings(body["prompt"]), buffer)
                self._answer(200, buffer.getvalue(), "application/octet-stream")

            def _answer(self, status: int, content: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args) -> None:  # quiet
                pass

        return Handler
