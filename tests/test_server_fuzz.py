"""A schema-driven fuzz run (schemathesis) against the server's own OpenAPI document, served by
a real server process with the real engine on a tiny model: whatever the request, the answer is
never a 500 or a crash, and every refusal has OpenAI's error shape."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from test_server import Server

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("torch")

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_model_dir):
    s = Server(tmp_path_factory.mktemp("fuzz") / "home", tiny_model_dir, "--max-upload-mb", "1")
    yield s
    s.stop()


def test_no_request_crashes_the_server(fuzz_server):
    """Each operation of the document, its requests generated from its schema (positive and
    negative cases), answered without a 500 and in OpenAI's error shape when refused."""
    from hypothesis import given

    api = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15  # every route is in the document

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=8,
            deadline=None,
            derandomize=True,  # the same requests every run: a failure reproduces, CI time is fixed
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def call(case):
            response = case.call(timeout=120)
            where = f"{case.method} {case.formatted_path}"
            assert response.status_code < 500, f"{where}: {response.status_code} {response.text}"
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, f"{where}: {response.text}"

        call()
        assert fuzz_server.proc.poll() is None


def test_an_upload_over_the_limit_is_refused_and_nothing_is_kept(fuzz_server, tmp_path):
    import httpx

    big = tmp_path / "big.jsonl"
    big.write_bytes(b'{"messages": []}\n' * 80_000)  # 1.3 MB; this server takes 1 MB
    with open(big, "rb") as fh:
        r = httpx.post(fuzz_server.url + "/v1/files", files={"file": fh}, data={"purpose": "fine-tune"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] in ("request_too_large", "file_too_large")
    listed = httpx.get(fuzz_server.url + "/v1/files").json()["data"]
    assert "big.jsonl" not in [f["filename"] for f in listed]
    assert not any(p.stat().st_size > 1_000_000 for p in (fuzz_server.home / "files").glob("*"))


def test_no_generated_request_is_answered_from_a_foreign_host_or_as_a_simple_body(fuzz_server):
    """The same operations from a web page's point of view: with another Host (DNS rebinding),
    every one is 400 invalid_host; with its body as text/plain (a CORS-simple request), every one
    that takes a body is 415."""
    from hypothesis import given

    api = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    for operation in [result.ok() for result in api.get_all_operations()]:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=2, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
        )
        def call(case):
            where = f"{case.method} {case.formatted_path}"
            foreign = case.call(headers={"host": "attacker.example"}, timeout=60)
            assert foreign.status_code == 400, f"{where}: {foreign.status_code}"
            if case.method.upper() != "HEAD":  # a HEAD answer has no body
                assert foreign.json()["error"]["code"] == "invalid_host", where
            if case.method.upper() == "POST" and case.body is not None and "multipart" not in str(case.media_type):
                plain = case.call(headers={"content-type": "text/plain"}, timeout=60)
                sent = plain.request.body or b""
                if sent:  # an operation with no request body sends none: nothing to refuse
                    assert plain.status_code == 415, f"{where}: {plain.status_code} {plain.text}"

        call()
