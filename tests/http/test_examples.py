"""The README's examples work as written, against a real broker process."""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.http.helpers import SseStream, new_topic
from tests.support.broker_process import BrokerProcess

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


async def test_the_llm_token_example_retries_without_asking_the_model_again(
    aclient: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its retry after a broken connection built the body anew, calling the model again:
    the lines stored before the break came from one generation, the rest from another
    (a real model does not answer twice alike). A retry sends again the lines the model
    made, then goes on with the same generation."""
    example = load_example("llm_tokens")
    generations = 0

    async def model(prompt: str) -> AsyncIterator[str]:
        nonlocal generations
        generations += 1
        for n in range(8):
            yield f"g{generations}-{n} "

    real_post, posts = httpx.AsyncClient.post, 0

    async def post_broken_once(self: httpx.AsyncClient, url: str, **kwargs: Any) -> Any:
        nonlocal posts
        posts += 1
        if posts == 1:  # three lines reach the broker, then the connection breaks
            body = kwargs["content"]

            async def three_lines_then_broken() -> AsyncIterator[bytes]:
                sent = 0
                async for line in body:
                    yield line
                    sent += 1
                    if sent == 3:
                        raise httpx.WriteError("the connection broke")

            kwargs["content"] = three_lines_then_broken()
        return await real_post(self, url, **kwargs)

    monkeypatch.setattr(example, "fake_llm", model)
    monkeypatch.setattr(httpx.AsyncClient, "post", post_broken_once)
    topic = new_topic("chat")
    answer = await example.stream_generation(str(aclient.base_url), topic, "why?")
    monkeypatch.undo()
    page = await aclient.get(
        f"/topics/{topic}/events", params={"limit": 100}, headers={"Accept": "application/json"}
    )
    tokens = [e["data"] for e in page.json()["events"] if e["event"] == "token"]
    assert posts == 2 and generations == 1
    assert tokens == [f"g1-{n} " for n in range(8)]
    assert [e["id"] for e in page.json()["events"]][:8] == answer["ids"]


@pytest.mark.parametrize("status", [502, 504])
async def test_the_llm_token_example_retries_a_proxys_answer_for_a_broker_gone(
    aclient: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """The shipped nginx answers 502 when the broker holding the ingest is killed (it
    does not send a POST again itself): the example raised, the topic was never closed,
    and every viewer waited for an end that would not come."""
    example = load_example("llm_tokens")
    real_post, posts = httpx.AsyncClient.post, 0

    async def a_proxy_answers_first(self: httpx.AsyncClient, url: str, **kwargs: Any) -> Any:
        nonlocal posts
        posts += 1
        if posts == 1:
            async for _ in kwargs["content"]:  # the body goes out, the broker dies with it
                break
            return httpx.Response(status, request=httpx.Request("POST", url))
        return await real_post(self, url, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "post", a_proxy_answers_first)
    monkeypatch.setattr(example.asyncio, "sleep", _no_wait)
    topic = new_topic("chat")
    answer = await example.stream_generation(str(aclient.base_url), topic, "why?")
    monkeypatch.undo()
    assert posts == 2 and answer["end_id"]
    info = await aclient.get(f"/topics/{topic}")
    assert info.json()["closed"] is True


async def _no_wait(seconds: float) -> None:
    return None


def test_the_llm_token_example_runs_as_the_readme_runs_it(
    http_broker: BrokerProcess, client: httpx.Client
) -> None:
    """``python examples/llm_tokens.py URL TOPIC PROMPT``, the README's command: it prints
    the generation's ids and its end, and the topic holds them, closed; run again on the
    same topic it stops with "closed already" (one topic per generation). The tests
    above call its function; this runs the program, its arguments and exit included."""
    topic = new_topic("chat")
    command = [sys.executable, str(EXAMPLES / "llm_tokens.py"), http_broker.url, topic,
               "Why is the sky blue?"]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    answer = ast.literal_eval(first.stdout.strip())  # (it prints the answer's dict)
    page = client.get(f"/topics/{topic}/events", params={"limit": 100},
                      headers={"Accept": "application/json"}).json()  # fmt: skip
    stored = [e["id"] for e in page["events"]]
    assert stored == [*answer["ids"], answer["end_id"]]
    assert "sky blue" in "".join(e["data"] for e in page["events"] if e["event"] == "token")
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 1 and "closed already" in again.stderr, again.stderr


def test_the_llm_token_example_without_its_arguments_says_its_usage() -> None:
    """A newcomer's first try, ``python examples/llm_tokens.py`` (or ``--help``): the
    usage, not an IndexError's traceback."""
    for args in ([], ["--help"]):
        command = [sys.executable, str(EXAMPLES / "llm_tokens.py"), *args]
        run = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        assert run.returncode == 1, run
        assert run.stderr.startswith("usage: "), run.stderr
        assert "Traceback" not in run.stderr, run.stderr
