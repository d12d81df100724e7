"""``serve --chat-upstream``: the gateway forwards chat to OpenAI-compatible engines (README
"Serving through vLLM"). vLLM cannot run here (no GPU, no CPU build on PyPI): a second ``serve``
process on the same data directory stands in for it, and the vLLM-specific parts (the adapter
directory its filesystem resolver reads, its rank rule) are checked against vLLM's documented
behaviour, untested against vLLM itself. Faults come from small servers of the test's own: one
that never answers, one that ignores the choice field."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import toy_examples
from test_server import MSGS, Server, free_port, upload, wait_job

openai = pytest.importorskip("openai")


class _Wrong(BaseHTTPRequestHandler):
    """An OpenAI-compatible engine that answers every chat with 'zzz' (ignores any choice field)."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = {
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "zzz"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


class _Vllm(BaseHTTPRequestHandler):
    """vLLM's run-time adapter loading as its documentation and source describe it (untested
    against vLLM itself): ``POST /v1/load_lora_adapter {lora_name, lora_path}`` answers 200 and
    a line of text, 400 "has already been loaded" for a name it has, 404 "No adapter found" for
    a path without an adapter, and the route is a 404 unless runtime updating is on; a chat
    request for a model it does not serve is a 404. ``loaded`` is the engine's memory (cleared:
    the engine restarted)."""

    loaded: dict[str, str] = {}
    runtime_updating = True
    loads: list[str] = []

    def _reply(self, status: int, body: object, content_type: str = "application/json") -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        if self.path == "/v1/load_lora_adapter":
            if not cls.runtime_updating:
                return self._reply(404, {"detail": "Not Found"})
            name, path = body.get("lora_name"), body.get("lora_path")
            cls.loads.append(name)
            if name in cls.loaded:
                message = f"The lora adapter '{name}' has already been loaded."
                return self._reply(400, {"error": {"message": message, "type": "InvalidUserInput", "code": 400}})
            if not (Path(path) / "adapter_config.json").exists():
                message = f"Loading lora {name} failed: No adapter found for {path}"
                return self._reply(404, {"error": {"message": message, "type": "NotFoundError", "code": 404}})
            cls.loaded[name] = path
            return self._reply(200, f"Success: LoRA adapter '{name}' added successfully.", "text/plain")
        model = body["model"]
        if model != "tiny-llama" and model not in cls.loaded:
            message = f"The model `{model}` does not exist."
            return self._reply(404, {"error": {"message": message, "type": "NotFoundError", "code": 404}})
        message = {"role": "assistant", "content": f"from {model}"}
        self._reply(
            200,
            {
                "id": "chatcmpl-v",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            },
        )

    def log_message(self, *args) -> None:
        pass


def test_adapters_are_loaded_through_the_engines_load_endpoint(engines, fine_tuned, tiny_model_dir):
    _engine, _gateway, root = engines
    vllm = ThreadingHTTPServer(("127.0.0.1", 0), _Vllm)
    threading.Thread(target=vllm.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{vllm.server_address[1]}/v1"
    gateway = Server(
        root / "home",
        tiny_model_dir,
        "--chat-upstream",
        url,
        env={"GPT_FINETUNE_VLLM_LOAD_ADAPTERS": "true", "GPT_FINETUNE_VLLM_LORA_DIR": str(root / "loaded")},
    )
    try:
        client, model = gateway.client(), fine_tuned.fine_tuned_model
        ask = dict(model=model, messages=MSGS, max_tokens=4)
        assert client.chat.completions.create(**ask).choices[0].message.content == f"from {model}"
        # given the published directory (the path the engines read), once for many requests
        assert _Vllm.loaded == {model: str(root / "loaded" / model)} and _Vllm.loads == [model]
        client.chat.completions.create(**ask)
        assert _Vllm.loads == [model]
        assert client.chat.completions.create(model="tiny-llama", messages=MSGS).choices[0].message.content
        assert _Vllm.loads == [model]  # a base model needs no adapter
        _Vllm.loaded.clear()  # the engine restarted: the next request loads it again, unseen by the client
        assert client.chat.completions.create(**ask).choices[0].message.content == f"from {model}"
        assert _Vllm.loads == [model, model]
        # an engine without run-time loading: one clear 502, not the engine's bare 404
        _Vllm.loaded.clear()
        _Vllm.runtime_updating = False
        r = httpx.post(gateway.url + "/v1/chat/completions", json=ask)
        assert r.status_code == 502 and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in r.json()["error"]["message"]
    finally:
        gateway.proc.terminate()  # not stop(): that ends every process of this data directory
        gateway.proc.wait(15)
        vllm.shutdown()


def _silent_port() -> tuple[socket.socket, int]:
    """A port that accepts connections and never answers (an engine stuck)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s, s.getsockname()[1]


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_model_dir):
    """The stand-in engine (a serve of its own) and a gateway in front of it, one data directory."""
    root = tmp_path_factory.mktemp("upstream")
    home = root / "home"
    engine = Server(home, tiny_model_dir, env={"GPT_FINETUNE_TRAINING_TYPE": "lora"})
    dead = free_port()  # nothing listens: the gateway passes it over
    gateway = Server(
        home,
        tiny_model_dir,
        "--chat-upstream",
        f"http://127.0.0.1:{dead}/v1",
        "--chat-upstream",
        engine.url + "/v1",
        env={"GPT_FINETUNE_VLLM_LORA_DIR": str(root / "loras")},
    )
    yield engine, gateway, root
    gateway.stop()
    engine.stop()


@pytest.fixture(scope="module")
def fine_tuned(engines, tmp_path_factory):
    """A job trained through the gateway: its adapter is what the engines are given."""
    _engine, gateway, _root = engines
    client = gateway.client()
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini",
        training_file=upload(client, tmp_path_factory.mktemp("data"), toy_examples(12)).id,
        hyperparameters={"n_epochs": 1, "batch_size": 4},
    )
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    return done


def test_the_gateway_answers_as_the_engine_does_for_base_and_fine_tuned_models(engines, fine_tuned):
    engine, gateway, root = engines
    client, done = gateway.client(), fine_tuned
    direct = engine.client()
    for model in ("tiny-llama", done.fine_tuned_model):
        asked = dict(model=model, messages=MSGS, max_tokens=6, temperature=0)
        through, alone = client.chat.completions.create(**asked), direct.chat.completions.create(**asked)
        assert through.choices[0].message.content == alone.choices[0].message.content
        assert through.model == model
        streamed = client.chat.completions.create(**asked, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == alone.choices[0].message.content
    # the adapter as vLLM's filesystem resolver reads it: <dir>/<model id>/, naming the served base
    published = root / "loras" / done.fine_tuned_model
    config = json.loads((published / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama" and config["peft_type"] == "LORA"
    assert (published / "adapter_model.safetensors").exists()
    # the gateway's own checks come first: an unknown model is its 404, a bad field its 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ft:nope", messages=MSGS)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llama", messages=MSGS, presence_penalty=1.0)
    assert err.value.body["param"] == "presence_penalty"


def test_upstream_faults_are_openai_errors_never_hangs(tmp_path, tiny_model_dir):
    silent, silent_port = _silent_port()
    wrong = ThreadingHTTPServer(("127.0.0.1", 0), _Wrong)
    threading.Thread(target=wrong.serve_forever, daemon=True).start()
    dead = free_port()
    home = tmp_path / "home"
    gateways = [
        # its jobs would train adapters of rank 64, more than vLLM loads by default
        Server(
            home, tiny_model_dir, "--chat-upstream", f"http://127.0.0.1:{dead}/v1", env={"GPT_FINETUNE_LORA_R": "64"}
        ),
        Server(
            home,
            tiny_model_dir,
            "--chat-upstream",
            f"http://127.0.0.1:{silent_port}/v1",
            env={"GPT_FINETUNE_CHAT_UPSTREAM_TIMEOUT": "1"},
        ),
        Server(home, tiny_model_dir, "--chat-upstream", f"http://127.0.0.1:{wrong.server_address[1]}/v1"),
    ]
    try:
        unreachable, stuck, ignoring = gateways
        client = unreachable.client()
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(
                model="gpt-4o-mini", training_file=upload(client, tmp_path, toy_examples(12)).id
            )
        assert "--max-lora-rank 16" in err.value.message and err.value.body["param"] == "lora_r"
        r = httpx.post(unreachable.url + "/v1/chat/completions", json={"model": "tiny-llama", "messages": MSGS})
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
        assert httpx.get(unreachable.url + "/health").json()["chat_upstreams"] == {"configured": 1, "unreachable": 1}
        t0 = time.monotonic()
        r = httpx.post(stuck.url + "/v1/chat/completions", json={"model": "tiny-llama", "messages": MSGS}, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - t0 < 20  # the timeout, not a hang
        choice = {"model": "tiny-llama", "messages": MSGS, "structured_outputs": {"choice": ["red", "blue"]}}
        r = httpx.post(ignoring.url + "/v1/chat/completions", json=choice)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_ignored_choice"
        plain = httpx.post(ignoring.url + "/v1/chat/completions", json={"model": "tiny-llama", "messages": MSGS})
        assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"] == "zzz"
        # label_choice is the local engine's extension: said so, not forwarded for the engine to ignore
        labels = {"model": "tiny-llama", "messages": MSGS, "label_choice": {"labels": ["red", "blue"]}}
        r = httpx.post(ignoring.url + "/v1/chat/completions", json=labels)
        assert r.status_code == 400 and r.json()["error"]["param"] == "label_choice"
    finally:
        for g in gateways:
            g.stop()
        wrong.shutdown()
        silent.close()
