"""Credentials out of anything printed or stored: URLs with their passwords and secret parameters masked."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_SECRET_PARAM = re.compile(r"(secret|password|passwd|token|key|credential|signature)", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with any password, and any query parameter that names a secret (`secret_key=`, `token=`, ...),
    replaced by '***' (for messages, logs and anything stored)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # not a URL: nothing that looks like one is printed as it is
        return url
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{port}" if port else "")
        parts = parts._replace(netloc=netloc)
    if parts.query:
        query = "&".join(f"{k}=***" if _SECRET_PARAM.search(k) else (f"{k}={v}" if sep else k)
                         for k, sep, v in (item.partition("=") for item in parts.query.split("&")))
        parts = parts._replace(query=query)
    return urlunsplit(parts)
