"""Stream an LLM's tokens to browsers through the broker, resumably.

The producer pipes its token stream into ONE request (streaming ingest,
``application/x-ndjson``): each line is stored and delivered as it arrives. The
``Idempotency-Key`` makes a retry after a broken connection safe (line n is
stored once, under ``key:n``), and ``?close=true`` ends the topic when the
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


async def stream_generation(broker_url: str, topic: str, prompt: str) -> dict[str, object]:
    """Pipe one generation into the topic and close it; retried whole if the connection
    breaks, under the same Idempotency-Key, so no token is stored twice."""
    key = f"gen-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(base_url=broker_url, timeout=30) as client:
        for attempt in range(5):
            try:
                response = await client.post(
                    f"/topics/{topic}/events",
                    params={"close": "true"},
                    headers={"Content-Type": "application/x-ndjson", "Idempotency-Key": key},
                    content=ndjson_lines(fake_llm(prompt)),
                )
            except httpx.TransportError:
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            if response.status_code == 503:
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            response.raise_for_status()
            return dict(response.json())
    raise RuntimeError("the broker did not take the generation")


if __name__ == "__main__":
    url, topic, prompt = sys.argv[1], sys.argv[2], " ".join(sys.argv[3:]) or "Hello"
    print(asyncio.run(stream_generation(url, topic, prompt)))
