"""mlx-lm's HTTP request handler with the two guards ``vq serve`` adds.

* A body that is not UTF-8 gets ``400 {"error": ...}``: mlx-lm's handler decodes it before
  parsing JSON and only catches JSON errors, so such a request used to drop the connection.
  A negative ``Content-Length`` is refused the same way (reading it would wait for the
  client to close).
* ``max_tokens`` (or ``max_completion_tokens``) above the server's ``--max-tokens`` is cut
  to it, so one request cannot hold the one-at-a-time server for hours; the reply then ends
  with ``finish_reason`` ``"length"`` after that many tokens.
* ``GET /v1/models`` lists the one model served (every request gets it, whatever it
  names). mlx-lm's lists the Hugging Face hub cache, and fails mid-response (an empty 200)
  on a machine that has none.

Everything else is mlx-lm's ``APIHandler`` unchanged.
"""

from __future__ import annotations

import io
import json
import logging

from mlx_lm.server import APIHandler


class VQHandler(APIHandler):
    """``APIHandler`` that refuses non-UTF-8 bodies and caps ``max_tokens``."""

    def do_POST(self):
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return super().do_POST()  # mlx-lm answers a missing or bad length itself
        if length < 0:
            return self._refuse(f"Content-Length {length} is negative")
        body = self.rfile.read(length)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._refuse(
                f"request body is not UTF-8 text (byte {e.start}: {e.reason}); "
                "send JSON encoded as UTF-8"
            )
        connection, self.rfile = self.rfile, io.BufferedReader(io.BytesIO(body))
        try:
            return super().do_POST()
        finally:
            self.rfile = connection  # the next request on a kept-alive connection

    def validate_model_parameters(self) -> None:
        super().validate_model_parameters()
        cap = self.response_generator.cli_args.max_tokens
        if self.max_tokens > cap:
            logging.info(f"max_tokens {self.max_tokens} cut to the server's cap {cap}")
            self.max_tokens = cap

    def handle_models_request(self) -> None:
        model = {"id": self.response_generator.cli_args.model, "object": "model"}
        self._set_completion_headers(200)
        self.end_headers()
        body = {"object": "list", "data": [{**model, "created": self.created}]}
        self.wfile.write(json.dumps(body).encode())

    def _refuse(self, message: str) -> None:
        self._set_completion_headers(400)
        self.end_headers()
        self.wfile.write(json.dumps({"error": message}).encode())
