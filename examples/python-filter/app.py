"""A Legate HTTP filter in Python (componentize-py, world http-filter).

- GET /hello-py is answered locally: 200, body "hello from python\n"
  (or the `greeting` from the plugin's config), never reaching the upstream.
- Every other request passes through; its response gets `x-python-filter: 1`.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import http, log, types

GREETING = "hello from python\n"


class HttpHandler(exports.HttpHandler):
    def configure(self, config: str) -> http.HttpSetup:
        global GREETING
        try:
            value = json.loads(config)
        except ValueError as e:
            raise Err(f"python-filter: config is not JSON: {e}")
        if value is not None:
            if not isinstance(value, dict) or set(value) - {"greeting"}:
                raise Err('python-filter: config must be null or {"greeting": "..."}')
            greeting = value.get("greeting", GREETING)
            if not isinstance(greeting, str):
                raise Err("python-filter: greeting must be a string")
            GREETING = greeting
        log.log(log.Level.INFO, "python-filter configured")
        return http.HttpSetup(
            phases=http.Phases.REQUEST_HEADERS | http.Phases.RESPONSE_HEADERS,
            request_body_mode=types.BodyMode.SKIPPED,
            response_body_mode=types.BodyMode.SKIPPED,
            tick_interval_ms=0,
        )

    def on_request_headers(self, context, exchange, headers, end_of_stream) -> http.Action:
        if exchange.path() == "/hello-py":
            return http.Action_Respond(
                http.LocalResponse(
                    status=200,
                    headers=[("content-type", b"text/plain; charset=utf-8")],
                    body=GREETING.encode(),
                    details="python_hello",
                )
            )
        return http.Action_Continue()

    def on_response_headers(self, context, exchange, headers, end_of_stream) -> http.Action:
        headers.set("x-python-filter", b"1")
        return http.Action_Continue()

    # The world exports the whole interface; these phases are never declared,
    # so the host never calls them.
    def on_tick(self) -> None:
        pass

    def on_tick_callout_response(self, id, response) -> None:
        pass

    def on_request_body(self, context, exchange, body, end_of_stream) -> http.Action:
        return http.Action_Continue()

    def on_request_trailers(self, context, exchange, trailers) -> http.Action:
        return http.Action_Continue()

    def on_response_body(self, context, exchange, body, end_of_stream) -> http.Action:
        return http.Action_Continue()

    def on_response_trailers(self, context, exchange, trailers) -> http.Action:
        return http.Action_Continue()

    def on_log(self, context, exchange) -> None:
        pass

    def on_callout_response(self, context, exchange, id, response) -> http.Action:
        return http.Action_Continue()

    def on_done(self, context) -> None:
        pass
