"""The built-in chat page at `/` (`--no-web-ui` leaves it out), as llama.cpp's server has one: a single static file,
web/chat.html, that talks to this server's /v1/chat/completions and nothing else. It loads nothing from anywhere
(no CDN, no fonts), so it works offline; its one inline script and one inline style are allowed by their hashes in a
Content-Security-Policy that lets the page connect to this origin only. The page is served without the API key, as
/health is: it holds no data, and the key it is given goes with its API requests."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

PAGE = Path(__file__).with_name("web") / "chat.html"


def source_hash(text: str) -> str:
    """A CSP source allowing an inline element whose text is `text`."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def page_headers(html: str) -> dict[str, str]:
    """The page's security headers: its inline <script> and <style> allowed by hash, every other source refused
    (no external origin, no plugin, no frame around it), connections to this origin only."""
    scripts = " ".join(source_hash(s) for s in re.findall(r"<script>(.*?)</script>", html, re.S))
    styles = " ".join(source_hash(s) for s in re.findall(r"<style>(.*?)</style>", html, re.S))
    policy = (f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; img-src 'self'; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}


def add_web_routes(app: FastAPI) -> None:
    """GET (or HEAD) / (the page) and GET /favicon.ico (204: browsers ask for it, and there is none)."""
    html = PAGE.read_text(encoding="utf-8")
    body, headers = html.encode(), page_headers(html)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: `curl -I`, uptime checks
    async def chat_page():
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)
