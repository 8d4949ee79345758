"""Stream an LLM's tokens to browsers through the broker, resumably.

The producer pipes its token stream into ONE request (streaming ingest,
``application/x-ndjson``): each line is stored and delivered as it arrives. The
``Idempotency-Key`` makes a retry after a broken connection safe (line n is
stored once, under ``key:n``; the retry sends again the lines the model already
made, then the rest of the same generation: the model is not asked twice, since
it would not answer twice alike), and ``?close=true`` ends the topic when the
generation is done, so every viewer's stream ends with ``broker.end`` and a
refreshed page that comes back later gets the whole answer replayed, then 204.

    python examples/llm_tokens.py http://127.0.0.1:8000 chat:42 "Why is the sky blue?"

A page follows it with a plain EventSource:

    const source = new EventSource("/topics/chat:42/events?from=earliest");
    source.addEventListener("token", (e) => answer.textContent += JSON.parse(e.data));
    source.addEventListener("broker.end", () => source.close());
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator

import httpx
import orjson


async def fake_llm(prompt: str) -> AsyncIterator[str]:
    """Stands in for a model: a few tokens, paced like one."""
    for token in f"You asked: {prompt!r}. Here is an answer, token by token.".split(" "):
        await asyncio.sleep(0.05)
        yield token + " "


async def ndjson_lines(tokens: AsyncIterator[str]) -> AsyncIterator[bytes]:
    async for token in tokens:
        yield orjson.dumps({"data": token, "event": "token"}) + b"\n"


class Generation:
    """One generation's lines, made once: each attempt's body sends again the lines
    made so far, then takes the next ones from the same model stream. (They are kept
    for that: about 60 bytes a token. ``brokerclient``'s ``Publisher.stream`` does
    the same.)"""

    def __init__(self, lines: AsyncIterator[bytes]) -> None:
        self._lines = lines
        self._made: list[bytes] = []

    async def body(self) -> AsyncIterator[bytes]:
        for line in list(self._made):
            yield line
        async for line in self._lines:
            self._made.append(line)
            yield line


async def stream_generation(broker_url: str, topic: str, prompt: str) -> dict[str, object]:
    """Pipe one generation into the topic and close it; retried whole if the connection
    breaks, under the same Idempotency-Key, so no token is stored twice."""
    key = f"gen-{uuid.uuid4().hex}"
    generation = Generation(ndjson_lines(fake_llm(prompt)))
    async with httpx.AsyncClient(base_url=broker_url, timeout=30) as client:
        for attempt in range(5):
            try:
                response = await client.post(
                    f"/topics/{topic}/events",
                    params={"close": "true"},
                    headers={"Content-Type": "application/x-ndjson", "Idempotency-Key": key},
                    content=generation.body(),
                )
            except httpx.TransportError:
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            if response.status_code in (502, 503, 504):  # (502, 504: a proxy's, its broker gone)
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            if response.status_code == 409:
                raise TopicClosedError(f"{topic} is closed already: one topic per generation")
            response.raise_for_status()
            return dict(response.json())
    raise RuntimeError("the broker did not take the generation")


class TopicClosedError(Exception):
    """The topic holds a finished generation (409): a new one needs a new topic."""


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
        sys.exit("usage: python examples/llm_tokens.py BROKER_URL TOPIC [PROMPT...]")
    url, topic, prompt = sys.argv[1], sys.argv[2], " ".join(sys.argv[3:]) or "Hello"
    try:
        print(asyncio.run(stream_generation(url, topic, prompt)))
    except TopicClosedError as error:
        sys.exit(f"error: {error}")
