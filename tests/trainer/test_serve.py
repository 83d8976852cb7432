"""`kubetune serve` against the official `openai` client: models, chat and text completions,
streaming, several adapters on one base, OpenAI-shaped errors.

The server runs in-process on a free port (a thread with its own event loop); the outputs are
two tiny trainings that were taught different answers.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.test_chat import QUESTION, train_output

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, builtin_cache: Path) -> Any:
    from kubetune.trainer.inference import ModelPool, open_output

    tmp = tmp_path_factory.mktemp("serve")
    yes = train_output(tmp, "yes", "yes yes yes", seed=7)
    no = train_output(tmp, "no", "no no no", seed=8)
    return ModelPool([open_output(str(yes)), open_output(str(no))], device="cpu")


@pytest.fixture(scope="module")
def base_url(pool: Any) -> Iterator[str]:
    from aiohttp import web
    from kubetune.trainer.server import make_app

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(pool))
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/v1"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


@pytest.fixture()
def client(base_url: str) -> Any:
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def _ask(client: Any, model: str, **kw: Any) -> Any:
    args = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, "temperature": 0, "seed": 1}
    return client.chat.completions.create(model=model, **{**args, **kw})


def test_models_lists_the_tuned_models_with_their_parent_and_the_base(client: Any) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"ft:tiny-llama:yes", "ft:tiny-llama:no", "tiny-llama"}
    for name in ("yes", "no"):
        card = models[f"ft:tiny-llama:{name}"]
        assert card.object == "model" and card.owned_by == "kubetune"
        assert card.parent == "tiny-llama"  # extra fields, as vLLM sends them
        assert card.root.endswith(f"/{name}")
    assert models["tiny-llama"].parent is None and models["tiny-llama"].root == "builtin://tiny-llama"
    assert client.models.retrieve("ft:tiny-llama:yes").id == "ft:tiny-llama:yes"


def test_chat_completion_answers_and_counts_tokens(client: Any) -> None:
    reply = _ask(client, "ft:tiny-llama:yes")
    assert reply.object == "chat.completion" and reply.model == "ft:tiny-llama:yes"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.startswith("yes yes yes")
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_gives_the_same_text_as_a_plain_answer(client: Any) -> None:
    for model, kw in [("ft:tiny-llama:yes", {}), ("ft:tiny-llama:no", {"temperature": 1.3, "seed": 5, "top_p": 0.9})]:
        plain = _ask(client, model, **kw).choices[0].message.content
        chunks = list(_ask(client, model, stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain and len([c for c in chunks if c.choices]) > 2
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_two_adapters_share_one_base_and_answer_differently(client: Any, pool: Any) -> None:
    yes = _ask(client, "ft:tiny-llama:yes").choices[0].message.content
    no = _ask(client, "ft:tiny-llama:no").choices[0].message.content
    base = _ask(client, "tiny-llama").choices[0].message.content
    assert yes.startswith("yes yes") and no.startswith("no no") and "yes yes" not in base and "no no" not in base
    assert _ask(client, "ft:tiny-llama:yes").choices[0].message.content == yes  # switching back works
    assert len(pool.base_models()) == 1  # both adapters on one copy of the base weights
    group = pool.models["ft:tiny-llama:yes"].group
    assert group is pool.models["ft:tiny-llama:no"].group is pool.models["tiny-llama"].group
    assert sorted(group.model.peft_config) == ["ft:tiny-llama:no", "ft:tiny-llama:yes"]


def test_sampling_parameters_n_seed_and_stop(client: Any) -> None:
    kw = {"temperature": 1.5, "top_p": 0.95, "max_completion_tokens": 10}
    first = _ask(client, "tiny-llama", n=2, seed=11, **kw)
    again = _ask(client, "tiny-llama", n=2, seed=11, **kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens == 20
    stopped = _ask(client, "ft:tiny-llama:yes", stop=[" y"], max_tokens=20).choices[0]
    assert stopped.message.content == "yes" and stopped.finish_reason == "stop"
    chunks = list(_ask(client, "ft:tiny-llama:yes", stop=" y", max_tokens=20, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "yes"


def test_text_completions_plain_and_streamed(client: Any) -> None:
    plain = client.completions.create(model="ft:tiny-llama:no", prompt="hello", max_tokens=8, temperature=0)
    assert plain.object == "text_completion" and plain.usage.completion_tokens == 8
    streamed = client.completions.create(
        model="ft:tiny-llama:no", prompt="hello", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_unknown_model_is_not_found(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        _ask(client, "ft:tiny-llama:nope")
    body = err.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model" and body["type"] == "invalid_request_error"
    assert "ft:tiny-llama:yes" in body["message"]  # says what there is
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_bad_requests_are_openai_shaped_400s(client: Any, base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, "ft:tiny-llama:yes", temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, "ft:tiny-llama:yes", max_tokens=10_000)
    assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="ft:tiny-llama:yes", messages=[])
    assert err.value.body["param"] == "messages"
    status, body = _raw(
        f"{base_url}/chat/completions",
        json.dumps({"model": "ft:tiny-llama:yes", "messages": [{"role": "robot", "content": "hi"}]}).encode(),
    )
    assert status == 400 and body["error"]["param"] == "messages[0].role" and "'user'" in body["error"]["message"]
    status, body = _raw(f"{base_url}/chat/completions", b"{not json")
    assert status == 400 and body["error"]["message"] == "the request body is not valid JSON"
    status, body = _raw(f"{base_url}/embeddings", b"{}")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def _raw(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_cli_refuses_a_corrupt_output_clearly(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from kubetune.cli import main

    (tmp_path / "manifest.json").write_text("{not json")
    result = CliRunner().invoke(main, ["serve", str(tmp_path), "--port", "0"])
    assert result.exit_code == 1
    assert "is not a valid manifest" in result.stderr and "Traceback" not in result.output


def test_serve_command_end_to_end(pool: Any, builtin_cache: Path) -> None:
    """`kubetune serve OUTPUT --port 0` in its own process: says where it listens, answers, stops on SIGTERM."""
    import os
    import subprocess
    import sys

    outputs = [str(m.output.path.parent) for m in pool.models.values() if m.output is not None]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune.cli", "serve", *outputs, "--port", "0", "--device", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = None
        for line in proc.stderr:  # type: ignore[union-attr]
            if line.startswith("serving "):
                url = line.split(" on ", 1)[1].split()[0]
                break
        assert url is not None, "the server never said where it listens"
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as client:
            assert {m.id for m in client.models.list()} == {"ft:tiny-llama:yes", "ft:tiny-llama:no", "tiny-llama"}
            assert _ask(client, "ft:tiny-llama:no").choices[0].message.content.startswith("no no")
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        proc.stderr.close()  # type: ignore[union-attr]
