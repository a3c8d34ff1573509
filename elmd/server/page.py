"""GET /: the chat page, served from files inside the package (elmd/web/).

The page holds no data of its own, so its files are served without the API key (the page
asks for the key when /v1/models answers 401, keeps it in the tab's session storage, and
sends it with every API call). Every file carries a Content-Security-Policy that allows
scripts, styles and connections from this origin only: no inline script, no CDN, no font
or image from elsewhere, so the privacy promise holds in the browser too.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
FILES = {  # URL path -> (file in elmd/web, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
PATHS = frozenset(FILES)

router = APIRouter()


def _serve(name: str, media_type: str):
    def page_file() -> Response:
        return Response(resources.files("elmd").joinpath("web", name).read_bytes(), media_type=media_type,
                        headers=HEADERS)

    return page_file


for path, (name, media_type) in FILES.items():
    router.add_api_route(path, _serve(name, media_type), methods=["GET"], include_in_schema=False)
