"""The wire format of request bodies: JSON read safely and checked field by field.

Bodies are read by hand rather than through pydantic models so that every refusal has OpenAI's
shape and names the field (``param``): wrong types, unknown fields and unsupported values are 400s,
never silently dropped. The chat request is checked by the chat service (the CLI shares it).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from ..errors import BackendError

JOB_FIELDS = {
    "model",
    "training_file",
    "validation_file",
    "hyperparameters",
    "method",
    "suffix",
    "seed",
    "metadata",
    "integrations",
}
MAX_METADATA_KEYS = 16


def bad(message: str, param: str | None, code: str = "invalid_value") -> BackendError:
    return BackendError(message, param=param, code=code)


async def read_json(request: Request) -> Any:
    raw = await request.body()
    from ..data.readers import JsonValueError, loads

    try:
        return loads(raw.decode("utf-8"))
    except JsonValueError as exc:  # NaN, lone surrogates, giant integers: not values anything here can use
        raise bad(str(exc), None, "invalid_json") from None
    except (ValueError, RecursionError):
        raise bad(
            "We could not parse the JSON body of your request. Send a JSON object with Content-Type: application/json.",
            None,
            "invalid_json",
        ) from None


def _str(body: dict[str, Any], key: str, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise bad(f"Missing required parameter: '{key}'.", key, "missing_required_parameter")
        return None
    if not isinstance(value, str) or not value:
        raise bad(f"{key} must be a non-empty string", key, "invalid_type")
    return value


def job_request(body: Any) -> dict[str, Any]:
    """``POST /v1/fine_tuning/jobs`` as keyword arguments of ``JobService.create``."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    unknown = sorted(set(body) - JOB_FIELDS)
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    if body.get("integrations") not in (None, []):
        raise bad(
            "integrations (Weights & Biases) are not supported by this server", "integrations", "unsupported_value"
        )
    hyper = body.get("hyperparameters")
    method = body.get("method")
    if hyper is not None and not isinstance(hyper, dict):
        raise bad("hyperparameters must be an object", "hyperparameters", "invalid_type")
    if method is not None:
        if not isinstance(method, dict):
            raise bad("method must be an object", "method", "invalid_type")
        kind = method.get("type")
        if kind in ("dpo", "reinforcement"):
            raise bad(
                f"method.type {kind!r} is not supported yet; this server trains type 'supervised'",
                "method.type",
                "unsupported_method",
            )
        if kind != "supervised":
            raise bad(f"method.type must be 'supervised', got {kind!r}", "method.type")
        extra = sorted(set(method) - {"type", "supervised"})
        if extra:
            raise bad(f"method.{extra[0]} is not supported", f"method.{extra[0]}", "unknown_parameter")
        supervised = method.get("supervised") or {}
        if not isinstance(supervised, dict) or set(supervised) - {"hyperparameters"}:
            raise bad("method.supervised takes hyperparameters only", "method.supervised", "invalid_type")
        inner = supervised.get("hyperparameters") or {}
        if not isinstance(inner, dict):
            raise bad("method.supervised.hyperparameters must be an object", "method.supervised.hyperparameters")
        if hyper and inner and hyper != inner:
            raise bad("give hyperparameters in method or at the top level, not both", "hyperparameters")
        hyper = inner or hyper
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items()
        ):
            raise bad("metadata must map strings (keys up to 64 characters) to strings (up to 512)", "metadata")
        if len(metadata) > MAX_METADATA_KEYS:
            raise bad(f"metadata holds at most {MAX_METADATA_KEYS} keys", "metadata")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed must be an integer", "seed", "invalid_type")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise bad("suffix must be a string", "suffix", "invalid_type")
    return {
        "model": _str(body, "model", required=True),
        "training_file": _str(body, "training_file", required=True),
        "validation_file": _str(body, "validation_file"),
        "hyperparameters": dict(hyper or {}),
        "suffix": suffix or None,
        "seed": seed,
        "metadata": metadata,
    }


# The request bodies this server accepts, for its OpenAPI document (``/openapi.json``): clients
# and the schema-driven fuzz test read them. The checks above and in the chat service are what
# enforce them; these describe the same fields.
_HYPER = {
    "type": "object",
    "properties": {
        "n_epochs": {"anyOf": [{"type": "string", "enum": ["auto"]}, {"type": "integer", "minimum": 1, "maximum": 50}]},
        "batch_size": {
            "anyOf": [{"type": "string", "enum": ["auto"]}, {"type": "integer", "minimum": 1, "maximum": 256}]
        },
        "learning_rate_multiplier": {
            "anyOf": [{"type": "string", "enum": ["auto"]}, {"type": "number", "exclusiveMinimum": 0}]
        },
    },
    "additionalProperties": False,
}
JOB_SCHEMA = {
    "type": "object",
    "required": ["model", "training_file"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "training_file": {"type": "string", "minLength": 1},
        "validation_file": {"type": ["string", "null"]},
        "hyperparameters": _HYPER,
        "method": {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"type": "string", "enum": ["supervised"]},
                "supervised": {"type": "object", "properties": {"hyperparameters": _HYPER}},
            },
        },
        "suffix": {"type": ["string", "null"], "maxLength": 64},
        "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": 2147483647},
        "metadata": {
            "type": ["object", "null"],
            "maxProperties": MAX_METADATA_KEYS,
            "additionalProperties": {"type": "string", "maxLength": 512},
        },
    },
    "additionalProperties": False,
}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
                    },
                },
            ]
        },
        "name": {"type": "string"},
    },
}
CHAT_SCHEMA = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "stop": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                {"type": "null"},
            ]
        },
        "seed": {"type": ["integer", "null"]},
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 8},
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
        "presence_penalty": {"type": ["number", "null"], "enum": [0, None]},
        "frequency_penalty": {"type": ["number", "null"], "enum": [0, None]},
        "user": {"type": "string"},
        "guided_choice": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
    },
}


def body_doc(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
