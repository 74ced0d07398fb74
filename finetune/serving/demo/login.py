"""With basic auth, gradio's login page still embeds `window.gradio_api_info`: every endpoint, its parameters and
the adapter names, for anyone who can reach the port. This ASGI middleware blanks it on that page only (the page
whose config says `auth_required`); the app itself, once logged in, is unchanged."""

from __future__ import annotations

import re
from typing import Any

API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.S)
LOGIN_MARK = b'"auth_required":true'


def hide_api_on_login_page(body: bytes) -> bytes:
    """The login page without the API description; any other page as it is."""
    if LOGIN_MARK not in body:
        return body
    # empty rather than null: with null the login page fetches the description itself (a 404 on /info)
    return API_INFO.sub(b'window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};</script>', body)


class LoginPageWithoutApi:
    """Buffers HTML answers to GET requests (the index page is small) and passes everything else through."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send_rewritten(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if not content_type.startswith(b"text/html"):
                    await send(message)
                    return
                start.update(message)
                return
            if not start or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = hide_api_on_login_page(b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_rewritten)
