"""mlx-lm's HTTP request handler with the two guards ``vq serve`` adds.

* A body that is not UTF-8 gets ``400 {"error": ...}``: mlx-lm's handler decodes it before
  parsing JSON and only catches JSON errors, so such a request used to drop the connection.
  A negative ``Content-Length`` is refused the same way (reading it would wait for the
  client to close).
* ``max_tokens`` (or ``max_completion_tokens``) above the server's ``--max-tokens`` is cut
  to it, so one request cannot hold the one-at-a-time server for hours; the reply then ends
  with ``finish_reason`` ``"length"`` after that many tokens.
* ``GET /v1/models`` lists the one model served (every request gets it, whatever it
  names, and the reply names it). mlx-lm's lists the Hugging Face hub cache, and fails
  mid-response (an empty 200) on a machine that has none. Every name maps to the one model
  before mlx-lm sees it, so requests naming different models still batch together.
* ``draft_model`` and ``adapters`` get a 400: the served model is loaded once, patched,
  and has neither (mlx-lm would otherwise try to load them and serve without them).
* A client that goes away mid-response is one log line, not a traceback (mlx-lm stops
  its generation and frees its cache).
* A prompt that does not fit the model's context (``max_position_embeddings``) gets a
  400 naming both counts; one that fits has ``max_tokens`` cut to the room left.

Everything else is mlx-lm's ``APIHandler`` unchanged.
"""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

from mlx_lm.server import APIHandler


class VQHandler(APIHandler):
    """``APIHandler`` with the guards above; :meth:`configured` gives it the model's
    tokenizer and context length."""

    tokenizer = None
    context_tokens: int | None = None

    @classmethod
    def configured(cls, tokenizer, context_tokens: int | None) -> type[VQHandler]:
        """A subclass that knows the served model's tokenizer and context length."""
        return type(
            cls.__name__, (cls,), {"tokenizer": tokenizer, "context_tokens": context_tokens}
        )

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
        if self.requested_draft_model != "default_model":
            raise ValueError("draft_model is not supported: vq serve serves one patched model")
        if self.adapter is not None:
            raise ValueError("adapters are not supported: vq serve serves one patched model")
        self.requested_model = self.response_generator.cli_args.model  # the one model served

    def handle_completion(self, request, stop_words):
        """Refuse a prompt longer than the model's context (400); cut ``max_tokens`` to the
        room left. The prompt is tokenized as mlx-lm's generation thread will tokenize it."""
        if self.tokenizer is not None and self.context_tokens is not None:
            args = SimpleNamespace(chat_template_kwargs=self.chat_template_kwargs)
            try:
                prompt = self.response_generator._tokenize(self.tokenizer, request, args)[0]
            except Exception:  # mlx-lm's own path reports a prompt it cannot tokenize
                prompt = None
            if prompt is not None:
                room = self.context_tokens - len(prompt)
                if room < 1:
                    return self._refuse(
                        f"the prompt has {len(prompt)} tokens; this model's context holds "
                        f"{self.context_tokens} (prompt and completion together)"
                    )
                if self.max_tokens > room:
                    logging.info(f"max_tokens {self.max_tokens} cut to the context's room {room}")
                    self.max_tokens = room
        try:
            return super().handle_completion(request, stop_words)
        except (BrokenPipeError, ConnectionResetError):  # mlx-lm has stopped its generation
            logging.info("client went away mid-response")

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
