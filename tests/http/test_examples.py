"""The README's examples work as written, against a real broker process."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import httpx

from tests.http.helpers import SseStream, new_topic

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def test_the_llm_token_example_streams_then_ends(aclient: httpx.AsyncClient) -> None:
    """A viewer subscribed before the first token gets every token as it is made, then
    ``broker.end`` and the end of its stream; a page refreshed afterwards gets the
    whole answer replayed, and its reconnect at the end is 204."""
    example = load_example("llm_tokens")
    topic = new_topic("chat")
    url = str(aclient.base_url)
    async with SseStream(aclient, f"/topics/{topic}/events") as live:
        producing = asyncio.create_task(example.stream_generation(url, topic, "why?"))
        first = await live.next(timeout=10)
        assert first.event == "token" and not producing.done(), "a token before the body ended"
        answer = await producing
        rest = await live.take(len(answer["ids"]), timeout=10)  # the other tokens, then the end
        assert rest[-1].event == "broker.end" and rest[-1].id == answer["end_id"]
        assert await live.wait_ended(5), "the stream ends after broker.end"
    async with SseStream(aclient, f"/topics/{topic}/events", params={"from": "earliest"}) as again:
        replayed = await again.take(len(answer["ids"]) + 1, timeout=10)
    assert [e.id for e in replayed] == [*answer["ids"], answer["end_id"]]
    over = await aclient.get(f"/topics/{topic}/events", headers={"Last-Event-ID": answer["end_id"]})
    assert over.status_code == 204
