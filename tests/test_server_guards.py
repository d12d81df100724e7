"""A server no web page can drive, and logs that keep no secrets: Host names, content types,
Origins, CORS, duplicate credentials, short keys, and the access log, against real ``serve``
processes over raw HTTP (a browser's requests are what the rules are for, not the SDK's)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import ROOT, toy_examples, write_jsonl

pytest.importorskip("fastapi")
pytest.importorskip("torch")

from test_server import Server

KEY = "sk-guards-0123456789"


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model_dir):
    s = Server(tmp_path_factory.mktemp("guards") / "home", tiny_model_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def opened(tmp_path_factory, tiny_model_dir):
    s = Server(
        tmp_path_factory.mktemp("guards-cors") / "home",
        tiny_model_dir,
        "--cors-origin",
        "https://app.example",
        "--allowed-host",
        "box.internal",
        "--api-key",
        KEY,
    )
    yield s
    s.stop()


def raw(server: Server, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, server.url + path, timeout=30, **kw)


def test_a_loopback_server_answers_only_loopback_host_names(plain):
    for host in (f"127.0.0.1:{plain.port}", f"localhost:{plain.port}", "localhost", f"[::1]:{plain.port}"):
        assert raw(plain, "GET", "/v1/models", headers={"host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{plain.port}", "127.0.0.1.evil.example", ""):
        r = raw(plain, "GET", "/v1/models", headers={"host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    assert status_of(plain, b"GET /v1/files HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n") == 400


def status_of(server: Server, request: bytes) -> int:
    """The status of a request sent as raw bytes (httpx will not send two Host headers)."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        return int(sock.recv(4096).split(b" ", 2)[1])


def test_request_bodies_must_be_json_or_multipart_and_foreign_origins_are_refused(plain, tmp_path):
    body = '{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}'
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": kind} if kind else {}
        r = raw(plain, "POST", "/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", kind
    ok = raw(plain, "POST", "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert ok.status_code == 404  # through the rules: the model does not exist
    # an upload must be multipart
    r = raw(plain, "POST", "/v1/files", content=b'{"x": 1}', headers={"content-type": "application/json"})
    assert r.status_code == 415
    data = write_jsonl(tmp_path / "t.jsonl", toy_examples(10))
    files = {"file": ("t.jsonl", data.read_bytes())}
    r = raw(
        plain,
        "POST",
        "/v1/files",
        files=files,
        data={"purpose": "fine-tune"},
        headers={"origin": "http://evil.example"},
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert raw(plain, "POST", "/v1/files", files=files, data={"purpose": "fine-tune"}).status_code == 200
    # a page on another origin cannot read answers either, and no CORS header invites one
    r = raw(plain, "GET", "/v1/models", headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    same = raw(plain, "GET", "/v1/models", headers={"origin": f"http://127.0.0.1:{plain.port}"})
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
    pre = raw(
        plain,
        "OPTIONS",
        "/v1/models",
        headers={"origin": "http://evil.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in pre.headers


def test_allowed_origins_and_host_names_and_one_authorization_header(opened):
    auth = {"authorization": f"Bearer {KEY}"}
    pre = raw(
        opened,
        "OPTIONS",
        "/v1/chat/completions",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type",
        },
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    r = raw(opened, "GET", "/v1/models", headers={**auth, "origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert raw(opened, "GET", "/v1/models", headers={**auth, "origin": "https://evil.example"}).status_code == 403
    assert raw(opened, "GET", "/v1/models", headers={**auth, "host": "box.internal:8000"}).status_code == 200
    assert raw(opened, "GET", "/v1/models", headers={**auth, "host": "other.internal"}).status_code == 400
    # two Authorization headers: which one counts would depend on a proxy, so neither does
    r = raw(opened, "GET", "/v1/models", headers=[("authorization", f"Bearer {KEY}"), ("authorization", "Bearer x")])
    assert r.status_code == 401 and "more than one Authorization" in r.json()["error"]["message"]
    assert raw(opened, "GET", "/v1/models", headers=auth).status_code == 200


def test_the_access_log_redacts_query_strings_and_escapes_control_characters(plain):
    raw(plain, "GET", "/v1/models?api_key=sk-secret-in-the-query-1234")
    raw(plain, "GET", "/v1/files/x%0AINFO:     forged 200 OK")
    time.sleep(0.3)
    log = plain.log.read_text()
    assert "sk-secret-in-the-query" not in log and "(query redacted)" in log
    assert "forged" in log and not any(line.startswith("INFO:     forged") for line in log.splitlines())
    assert "x\\x0aINFO:" in log


@pytest.mark.parametrize("key", ["", "x", "short-key", "has a space in it ok"])
def test_empty_short_and_spaced_keys_are_refused_at_start(tmp_path, key):
    done = subprocess.run(
        [sys.executable, "-m", "gpt_finetune", "serve", "--home", str(tmp_path / "h"), "--port", "0", "--api-key", key],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 1 and "needs at least 12 printable characters" in done.stderr
    if len(key) > 8:
        assert key not in done.stderr  # shown redacted


def test_model_ids_are_names_never_paths_or_hub_ids(plain, tmp_path):
    """A client can neither load a directory of the server's disk, nor learn which exist, nor make
    the server download; every such name gets the same 404 as a name that means nothing."""
    looks_like_a_model = tmp_path / "secret-model"
    looks_like_a_model.mkdir()
    (looks_like_a_model / "config.json").write_text("{}")
    names = [
        str(looks_like_a_model),
        str(tmp_path),
        "/etc",
        "../../etc",
        "HuggingFaceTB/SmolLM2-360M-Instruct",
        "no-such-model",
        "x" * 300,
    ]
    before = {m["id"] for m in raw(plain, "GET", "/v1/models").json()["data"]}
    for name in names:
        r = raw(
            plain, "POST", "/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}]}
        )
        error = r.json()["error"]
        shown = name if len(name) <= 100 else name[:100] + "..."
        assert (r.status_code, error["code"], error["message"]) == (
            404,
            "model_not_found",
            f"The model '{shown}' does not exist",
        ), name
    upload = raw(
        plain,
        "POST",
        "/v1/files",
        files={"file": ("t.jsonl", write_jsonl(tmp_path / "t.jsonl", toy_examples(10)).read_bytes())},
        data={"purpose": "fine-tune"},
    )
    for name in names[:5]:
        r = raw(plain, "POST", "/v1/fine_tuning/jobs", json={"model": name, "training_file": upload.json()["id"]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", name
    assert {m["id"] for m in raw(plain, "GET", "/v1/models").json()["data"]} == before
    assert not raw(plain, "GET", "/v1/fine_tuning/jobs").json()["data"]  # no job was made


def test_small_gaps(plain, tmp_path):
    assert raw(plain, "HEAD", "/health").status_code == 200
    rows = toy_examples(10)
    up = raw(
        plain,
        "POST",
        "/v1/files",
        files={"file": ("t.jsonl", write_jsonl(tmp_path / "t.jsonl", rows).read_bytes())},
        data={"purpose": "fine-tune"},
    ).json()
    batch = raw(
        plain,
        "POST",
        "/v1/files",
        files={"file": ("b.jsonl", (tmp_path / "t.jsonl").read_bytes())},
        data={"purpose": "batch"},
    ).json()
    # a suffix that would add ':' parts to model ids, and a file uploaded for another purpose
    r = raw(
        plain, "POST", "/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": up["id"], "suffix": "a:b"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    r = raw(plain, "POST", "/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": batch["id"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file_purpose"
    # a message name of the wrong type
    r = raw(
        plain,
        "POST",
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x", "name": 5}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].name"
    # a file whose content was removed from disk behind the store's back
    home = plain.home
    next((home / "files").glob(f"{up['id']}*")).unlink()
    r = raw(plain, "GET", f"/v1/files/{up['id']}/content")
    assert r.status_code == 404 and str(home) not in r.text


def test_home_is_taken_after_the_subcommand_too(tmp_path):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    for argv in (["files", "list", "--home", str(tmp_path / "a")], ["files", "--home", str(tmp_path / "b"), "list"]):
        done = subprocess.run(
            [sys.executable, "-m", "gpt_finetune", *argv, "--backend", "local"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "a" / "gpt-finetune.db").is_file() and (tmp_path / "b" / "gpt-finetune.db").is_file()


ODD_CHATS = {
    "top_p 0": {"top_p": 0},
    "the smallest top_p": {"top_p": 5e-324},
    "a tiny temperature": {"temperature": 1e-39},
    "the smallest temperature": {"temperature": 5e-324, "n": 3},
    "hot and narrow": {"temperature": 2, "top_p": 0},
    "the largest seed": {"seed": 2**63 - 1, "temperature": 1},
    "top logprobs of a tiny temperature": {"temperature": 1e-39, "logprobs": True, "top_logprobs": 20},
}


@pytest.mark.parametrize("name", list(ODD_CHATS))
def test_values_that_pass_type_checks_work_or_get_a_400_never_a_500(plain, name):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **ODD_CHATS[name]}
    r = raw(plain, "POST", "/v1/chat/completions", json=body)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        assert all(c["message"]["content"] is not None for c in r.json()["choices"])
    else:
        assert r.json()["error"]["param"]


@pytest.mark.parametrize(
    "raw_body",
    [
        '{"model": "gpt-4o-mini", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud800 x"}]}',
        '{"model": "gpt-4o-mini", "max_tokens": 2, "stop": ["\\udfff"], "messages": [{"role": "user", "content": "x"}]}',
        '{"model": "gpt-4o-mini", "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}',
        '{"model": "gpt-4o-mini", "max_tokens": ' + "9" * 5000 + ', "messages": [{"role": "user", "content": "x"}]}',
    ],
)
def test_json_no_later_step_could_use_is_a_400(plain, raw_body):
    r = raw(plain, "POST", "/v1/chat/completions", content=raw_body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_a_stream_the_engine_refuses_gets_its_http_error_before_any_200(plain):
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10**9,
        "stream": True,
    }
    r = raw(plain, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    ok = raw(plain, "POST", "/v1/chat/completions", json={**body, "max_tokens": 3})
    assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")


def test_errors_never_echo_a_huge_value_or_a_server_path(plain, tmp_path):
    r = raw(
        plain,
        "POST",
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "x" * 15_000_000, "content": "hi"}]},
    )
    assert r.status_code == 400 and len(r.content) < 3000 and "more characters" in r.text
    array = tmp_path / "array.jsonl"
    array.write_text('[\n{"messages": [{"role": "user", "content": "q"}]}\n]\n')
    up = raw(
        plain, "POST", "/v1/files", files={"file": ("array.jsonl", array.read_bytes())}, data={"purpose": "fine-tune"}
    ).json()
    job = raw(plain, "POST", "/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": up["id"]}).json()
    deadline = time.time() + 60
    while time.time() < deadline and job["status"] not in ("failed", "succeeded"):
        time.sleep(0.5)
        job = raw(plain, "GET", f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert job["status"] == "failed"
    assert job["error"]["message"].startswith("array.jsonl: is a JSON array") and str(plain.home) not in json.dumps(job)


def test_a_huge_config_value_is_not_printed_whole(tmp_path):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    data = write_jsonl(tmp_path / "t.jsonl", toy_examples(10))
    cfg = tmp_path / "train.cfg"
    cfg.write_text("n_epochs = " + "7" * 1_000_000 + "\n")
    argv = ["finetune", "-d", str(data), "-c", str(cfg), "--backend", "local", "--home", str(tmp_path / "h")]
    done = subprocess.run(
        [sys.executable, "-m", "gpt_finetune", *argv], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 1 and "train.cfg:1: n_epochs" in done.stderr and len(done.stderr) < 2000


def test_a_request_is_bounded_by_what_it_costs(plain):
    """A chat small in bytes but long in messages neither freezes the engine nor reaches the
    model past its context: past 2,048 messages it is refused at once; within, its prompt is
    fitted in linear time, or refused with 400 when even shortened it cannot fit."""
    short = [{"role": "user", "content": "hi"}]
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(10_001)]
    r = raw(plain, "POST", "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": many})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    long = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} of a long chat"} for i in range(2_001)
    ]
    results = {}

    def ask_long():
        results["long"] = raw(
            plain, "POST", "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": long, "max_tokens": 2}
        )

    thread = threading.Thread(target=ask_long)
    started = time.monotonic()
    thread.start()
    time.sleep(0.2)
    assert raw(plain, "GET", "/health").status_code == 200
    assert (
        raw(
            plain, "POST", "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": short, "max_tokens": 2}
        ).status_code
        == 200
    )
    thread.join(60)
    assert time.monotonic() - started < 20  # minutes before prompt fitting was linear
    error = results["long"].json()["error"]
    assert (
        results["long"].status_code == 400
        and error["code"] == "context_length_exceeded"
        and error["param"] == "messages"
    )


def test_a_client_that_hangs_up_on_a_whole_answer_frees_its_place(plain):
    busy = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 512,
        "n": 8,
        "temperature": 1,
    }
    thread = threading.Thread(target=lambda: raw(plain, "POST", "/v1/chat/completions", json=busy))
    thread.start()
    time.sleep(0.5)
    with pytest.raises(httpx.TimeoutException):  # waits in the queue, then hangs up
        httpx.post(plain.url + "/v1/chat/completions", json={**busy, "n": 1}, timeout=1.0)
    deadline = time.monotonic() + 5
    while raw(plain, "GET", "/health").json()["queued_requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert raw(plain, "GET", "/health").json()["queued_requests"] == 0
    assert thread.is_alive()  # its place was freed while the engine was still busy, not by its turn
    thread.join(120)


def test_a_chunked_upload_over_the_limit_is_413(tmp_path_factory, tiny_model_dir):
    s = Server(tmp_path_factory.mktemp("small-uploads") / "home", tiny_model_dir, "--max-upload-mb", "1")

    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for _ in range(40):
            yield b"x" * 65536
        yield b"\r\n--b--\r\n"

    try:
        r = httpx.post(
            s.url + "/v1/files", content=body(), headers={"content-type": "multipart/form-data; boundary=b"}, timeout=30
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert not (s.home / "files").exists() or not list((s.home / "files").iterdir())  # nothing kept
    finally:
        s.stop()
