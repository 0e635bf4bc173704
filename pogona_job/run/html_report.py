"""report.html: the same markdown as report.md, as one self-contained page that opens where it lives.

A presigned URL or the S3 console opens an object in the browser only when it is text/html, and a
page in a bucket cannot load its neighbours (no credentials on those requests). So every image the
markdown references is embedded as a data: URI, there is no script, stylesheet or font from
elsewhere, and a Content-Security-Policy forbids the browser to fetch anything at all. Built from
the very markdown report.md holds, so the two never disagree; the order (headline, verdict, next
steps first) is the markdown's.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
line-height:1.45;color:#1d1d1f}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}code{background:#f3f3f3;padding:0 .2em}pre{background:#f6f6f6;padding:.6em;overflow:auto}
img{max-width:100%;border:1px solid #ddd;margin:.3em 0}blockquote{border-left:4px solid #c33;margin:.6em 0;
padding:.2em .8em;background:#fff4f4}
"""


def data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def to_html(markdown_text: str, images: dict[str, Path], title: str) -> str:
    """The page for `markdown_text`; `images` maps each relative key the markdown references to its local
    file. A referenced image without a local file becomes its alt text (never a request)."""
    import markdown  # type: ignore[import-untyped]

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code", "sane_lists"], output_format="html")

    def embed(match: re.Match[str]) -> str:
        tag = match.group(0)
        src = html.unescape(re.search(r'src="([^"]*)"', tag).group(1))  # type: ignore[union-attr]
        alt = re.search(r'alt="([^"]*)"', tag)
        local = images.get(src)
        if local is None or not local.exists():
            return f"<em>[{alt.group(1) if alt else html.escape(src)}: not available]</em>"
        return tag.replace(match.group(1), f'src="{data_uri(local)}"')

    body = re.sub(r'<img[^>]*?(src="[^"]*")[^>]*>', embed, body)
    # Links to the run's other files are relative keys: fine beside the report, never fetched on load.
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
