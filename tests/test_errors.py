"""The error tree carries what an HTTP adapter needs: status, OpenAI's type, param and code."""

from __future__ import annotations

import pytest

from gpt_finetune.errors import (
    BackendError,
    ConfigError,
    DataError,
    DependencyError,
    GptFinetuneError,
    NotFoundError,
    StoreError,
)
from gpt_finetune.request_rules import check_hyperparameters


@pytest.mark.parametrize(
    ("error", "status", "kind", "code"),
    [
        (ConfigError("bad value"), 400, "invalid_request_error", "invalid_config"),
        (
            DataError("bad line", path="f.jsonl", line=3, field="messages"),
            400,
            "invalid_request_error",
            "invalid_training_file",
        ),
        (BackendError("refused", code="invalid_suffix"), 400, "invalid_request_error", "invalid_suffix"),
        (
            BackendError("busy", code="job_not_cancellable", status=409),
            409,
            "invalid_request_error",
            "job_not_cancellable",
        ),
        (NotFoundError("no such job", code="job_not_found"), 404, "invalid_request_error", "job_not_found"),
        (DependencyError("no torch"), 500, "server_error", "missing_dependency"),
        (StoreError("broken store"), 500, "server_error", "store_error"),
    ],
)
def test_each_error_maps_to_an_openai_error(error, status, kind, code):
    assert isinstance(error, GptFinetuneError)
    assert error.status == status
    body = error.to_openai()["error"]
    assert body == {"message": error.message, "type": kind, "param": error.param, "code": code}


def test_data_errors_name_their_field_as_the_param():
    err = DataError("content is empty", path="t.jsonl", line=4, field="messages[1].content")
    assert err.message == "t.jsonl:4: messages[1].content: content is empty"
    assert err.param == "messages[1].content"


def test_hyperparameter_errors_name_the_hyperparameter():
    with pytest.raises(BackendError) as err:
        check_hyperparameters({"n_epochs": 99})
    assert err.value.param == "hyperparameters.n_epochs" and err.value.status == 400
    with pytest.raises(BackendError) as err:
        check_hyperparameters({"learning_rate_multiplier": float("inf")})
    assert err.value.param == "hyperparameters.learning_rate_multiplier"
