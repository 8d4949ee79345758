"""Content negotiation: what a request's Content-Type is, and what its Accept prefers."""

from __future__ import annotations


def media_type_of(header: str) -> tuple[str, str | None]:
    """``"text/plain; charset=UTF-8"`` -> ``("text/plain", "utf-8")``."""
    media_type, *params = header.split(";")
    charset = None
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return media_type.strip().lower(), charset


def _quality(accept: str, wanted: str) -> float:
    """The q-value Accept gives a media type, counting ``type/*`` and ``*/*`` (RFC 9110)."""
    best, best_specificity = 0.0, -1
    major = wanted.split("/")[0]
    for item in accept.split(","):
        media_type, *params = item.strip().split(";")
        media_type = media_type.strip().lower()
        specificity = {wanted: 2, f"{major}/*": 1, "*/*": 0}.get(media_type, -1)
        if specificity <= best_specificity:
            continue
        best, best_specificity = _q_param(params), specificity
    return best


def _q_param(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return min(max(float(value), 0.0), 1.0)
            except ValueError:
                return 0.0
    return 1.0


def prefers_json(accept: str) -> bool:
    """True when Accept ranks application/json above text/event-stream.

    No Accept (curl) or ``*/*`` gets the stream: a GET of a topic's events is a
    subscription unless the client says it would rather have JSON.
    """
    if not accept.strip():
        return False
    return _quality(accept, "application/json") > _quality(accept, "text/event-stream")
