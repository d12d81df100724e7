"""The one home of request rules: the fine-tuning and chat requests, checked field by field and
described (JSON Schema, for the server's OpenAPI document) from the same declarations.

Every refusal is a ``BackendError`` with OpenAI's shape that names the field (``param``): a wrong
type is ``invalid_type``, a value out of bounds ``invalid_value`` (``invalid_hyperparameters`` for
a job's hyperparameters, as OpenAI says it), an unknown field ``unknown_parameter`` or
``unsupported_parameter``; nothing is silently dropped. The bounds are the contract's.

Why not pydantic models: their validation errors carry pydantic's own types (``int_parsing``,
``less_than_equal``), which map onto OpenAI's codes only through a second table, and their lax
mode turns ``"3"`` and ``true`` into numbers; a declaration per field (``contract.Spec``) with one
checker keeps the refusals exactly OpenAI's and lets the CLI, which never loads FastAPI, share them.
The chat request is checked by the chat service (the CLI and evaluation call it too); the
fine-tuning request by the server's route, then by the jobs service.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .contract import (
    AUTO,
    HYPERPARAMETERS,
    LABEL_FORMATS,
    MAX_CHOICES,
    MAX_MESSAGES,
    MAX_METADATA_KEYS,
    MAX_N,
    MAX_STOP,
    MAX_TOP_LOGPROBS,
    METADATA_KEY_MAX,
    METADATA_VALUE_MAX,
    METHODS,
    SEED_MAX,
    SUFFIX_MAX,
    SUFFIX_PATTERN,
    TEMPERATURE_RANGE,
    TOP_P_RANGE,
    LabelChoice,
    Spec,
    SupervisedHyperparameters,
    WrongType,
    spec_of,
    suffix_problem,
)
from .errors import BackendError


def bad(message: str, param: str | None, code: str = "invalid_value") -> BackendError:
    return BackendError(message, param=param, code=code)


def checked(spec: Spec, value: Any, param: str, *, code: str | None = None) -> Any:
    """One value against its declaration, or the refusal that names ``param``."""
    try:
        return spec.check(value)
    except WrongType as exc:
        raise bad(f"{param} {exc}, got {value!r}", param, code or "invalid_type") from None
    except ValueError as exc:
        raise bad(f"{param} {exc}, got {value!r}", param, code or "invalid_value") from None


# ---- fine-tuning jobs -----------------------------------------------------------------------------
JOB_FIELDS = (
    "model",
    "training_file",
    "validation_file",
    "hyperparameters",
    "method",
    "suffix",
    "seed",
    "metadata",
    "integrations",
)
SEED = Spec("int", "makes the job reproducible", lo=0, hi=SEED_MAX)


def hyperparameters(hp: Any, method: str = "supervised", param: str = "hyperparameters") -> SupervisedHyperparameters:
    """A method's hyperparameters, each within OpenAI's bounds or ``auto``."""
    group = HYPERPARAMETERS[method]
    if isinstance(hp, group):  # built by a caller: checked all the same
        hp = hp.to_json()
    if hp is None:
        hp = {}
    if not isinstance(hp, Mapping):
        raise bad(f"{param} must be an object", param, "invalid_type")
    declared = dict(group.declared())
    unknown = sorted(set(hp) - set(declared))
    if unknown:
        raise bad(f"unknown hyperparameters: {', '.join(unknown)}", param, "invalid_hyperparameters")
    values = {
        name: checked(spec_of(declared[name]), hp[name], f"{param}.{name}", code="invalid_hyperparameters")
        for name in declared
        if hp.get(name) not in (None, AUTO)  # None: not given (a CLI setting left unset)
    }
    return group(**values)


def check_hyperparameters(hp: Any) -> dict[str, Any]:
    """The checked hyperparameters as JSON (``auto`` for those not given)."""
    return hyperparameters(hp).to_json()


def check_names(*, suffix: str | None, seed: int | None) -> None:
    """The suffix and seed, as both backends refuse them before anything is uploaded."""
    problem = suffix_problem(suffix) if suffix is not None else None
    if problem:
        raise bad(problem, "suffix", "invalid_suffix")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not SEED.within(seed)):
        raise bad(f"seed must be from 0 to {SEED_MAX}, got {seed}", "seed", "invalid_seed")


def check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= METADATA_KEY_MAX and len(v) <= METADATA_VALUE_MAX
        for k, v in metadata.items()
    ):
        raise bad(
            f"metadata must map strings (keys up to {METADATA_KEY_MAX} characters) to strings "
            f"(up to {METADATA_VALUE_MAX})",
            "metadata",
        )
    if len(metadata) > MAX_METADATA_KEYS:
        raise bad(f"metadata holds at most {MAX_METADATA_KEYS} keys", "metadata")
    return dict(metadata)


def _str(body: Mapping[str, Any], key: str, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise bad(f"Missing required parameter: '{key}'.", key, "missing_required_parameter")
        return None
    if not isinstance(value, str) or not value:
        raise bad(f"{key} must be a non-empty string", key, "invalid_type")
    return value


@dataclass(frozen=True)
class JobRequest:
    """``POST /v1/fine_tuning/jobs``, checked."""

    model: str
    training_file: str
    validation_file: str | None = None
    method: str = "supervised"
    hyperparameters: SupervisedHyperparameters = field(default_factory=SupervisedHyperparameters)
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``JobService.create``."""
        return {
            "model": self.model,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "hyperparameters": self.hyperparameters,
            "method": self.method,
            "suffix": self.suffix,
            "seed": self.seed,
            "metadata": self.metadata,
        }


def job_request(body: Any) -> JobRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    unknown = sorted(set(body) - set(JOB_FIELDS))
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    if body.get("integrations") not in (None, []):
        raise bad(
            "integrations (Weights & Biases) are not supported by this server", "integrations", "unsupported_value"
        )
    hyper = body.get("hyperparameters")
    method = body.get("method")
    kind: Any = "supervised"
    if hyper is not None and not isinstance(hyper, dict):
        raise bad("hyperparameters must be an object", "hyperparameters", "invalid_type")
    if method is not None:
        if not isinstance(method, dict):
            raise bad("method must be an object", "method", "invalid_type")
        kind = method.get("type")
        if kind == "reinforcement":
            raise bad(
                f"method.type {kind!r} (graders) is not supported yet; this server trains type "
                f"{', '.join(map(repr, METHODS))}",
                "method.type",
                "unsupported_method",
            )
        if kind not in METHODS:
            raise bad(f"method.type must be one of {', '.join(map(repr, METHODS))}, got {kind!r}", "method.type")
        extra = sorted(set(method) - {"type", kind})
        if extra:
            raise bad(f"method.{extra[0]} is not supported", f"method.{extra[0]}", "unknown_parameter")
        inner_body = method.get(kind) or {}
        if not isinstance(inner_body, dict) or set(inner_body) - {"hyperparameters"}:
            raise bad(f"method.{kind} takes hyperparameters only", f"method.{kind}", "invalid_type")
        inner = inner_body.get("hyperparameters") or {}
        if not isinstance(inner, dict):
            raise bad(f"method.{kind}.hyperparameters must be an object", f"method.{kind}.hyperparameters")
        if hyper and inner and hyper != inner:
            raise bad("give hyperparameters in method or at the top level, not both", "hyperparameters")
        hyper = inner or hyper
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed must be an integer", "seed", "invalid_type")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise bad("suffix must be a string", "suffix", "invalid_type")
    model = _str(body, "model", required=True)
    training_file = _str(body, "training_file", required=True)
    assert model is not None and training_file is not None
    return JobRequest(
        model=model,
        training_file=training_file,
        validation_file=_str(body, "validation_file"),
        method=kind,
        hyperparameters=hyperparameters(hyper, kind),
        suffix=suffix or None,
        seed=seed,
        metadata=check_metadata(body.get("metadata")),
    )


def _group_schema(group: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {f.name: spec_of(f).json_schema() for f in group.__dataclass_fields__.values()},
        "additionalProperties": False,
    }


def job_schema() -> dict[str, Any]:
    hyper = _group_schema(SupervisedHyperparameters)
    by_method = {m: _group_schema(HYPERPARAMETERS[m]) for m in METHODS}
    return {
        "type": "object",
        "required": ["model", "training_file"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "training_file": {"type": "string", "minLength": 1},
            "validation_file": {"type": ["string", "null"]},
            "hyperparameters": hyper,
            "method": {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"type": "string", "enum": list(METHODS)},
                    **{m: {"type": "object", "properties": {"hyperparameters": by_method[m]}} for m in METHODS},
                },
            },
            "suffix": {"type": ["string", "null"], "maxLength": SUFFIX_MAX, "pattern": SUFFIX_PATTERN.pattern},
            "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": SEED_MAX},
            "metadata": {
                "type": ["object", "null"],
                "maxProperties": MAX_METADATA_KEYS,
                "propertyNames": {"maxLength": METADATA_KEY_MAX},
                "additionalProperties": {"type": "string", "maxLength": METADATA_VALUE_MAX},
            },
        },
        "additionalProperties": False,
    }


# ---- chat completions -------------------------------------------------------------------------------
ROLES = ("system", "developer", "user", "assistant")
# the plain fields: each checked against its declaration (None is "not given")
CHAT_FIELDS: Mapping[str, Spec] = {
    "max_tokens": Spec("int", "longest answer in tokens", lo=1, nullable=True),
    "max_completion_tokens": Spec("int", "longest answer in tokens", lo=1, nullable=True),
    "temperature": Spec("float", "0 is greedy", lo=TEMPERATURE_RANGE[0], hi=TEMPERATURE_RANGE[1], nullable=True),
    "top_p": Spec("float", "nucleus sampling", lo=TOP_P_RANGE[0], hi=TOP_P_RANGE[1], nullable=True),
    "seed": Spec("int", "makes sampling reproducible", lo=-(2**63), hi=2**63 - 1, nullable=True),
    "n": Spec("int", "answers to give", lo=1, hi=MAX_N, nullable=True),
    "logprobs": Spec("bool", "the log-probability of each token", nullable=True),
    "top_logprobs": Spec("int", "the most likely tokens at each position", lo=0, hi=MAX_TOP_LOGPROBS, nullable=True),
    "stream": Spec("bool", "answer as server-sent events", nullable=True),
}
# the fields with a shape of their own (checked in ``parse_chat``)
SHAPED = ("model", "messages", "stop", "stream_options", "guided_choice", "structured_outputs", "label_choice")


def choice_constraint(choices: list[str]) -> dict[str, Any]:
    """The request fields that constrain an answer to one of ``choices``, as clients send them
    today: vLLM's ``structured_outputs`` (its ``guided_choice`` was removed in v0.12 and is now
    ignored there). This server accepts both."""
    return {"structured_outputs": {"choice": list(choices)}}


def ignored_constraint(answer: str, choices: list[str], model: str = "the model") -> BackendError | None:
    """The error for an answer outside the candidates a request constrained it to: a server
    without the extension (or a vLLM that dropped ``guided_choice``) answers freely with HTTP
    200, and scoring that as constrained would mislabel the comparison."""
    if answer.strip() in choices:
        return None
    return BackendError(
        f"{model} answered {answer.strip()[:60]!r}, none of the {len(choices)} label sets: the server "
        "ignored the choice constraint (structured_outputs.choice)",
        hint="score it with --mode free, or serve it with gpt-finetune serve or vLLM 0.12+",
        code="constraint_ignored",
    )


def threshold_problem(thresholds: Any, labels: Sequence[str]) -> tuple[str, str | None] | None:
    """The first problem of per-label thresholds (an object label -> probability from 0 to 1):
    ("type", None), ("label", an unknown label) or ("value", the label whose value is not a
    probability); None when they are fine. The server's ``label_choice.thresholds`` and ``infer
    --thresholds`` check with it, each saying it in its own terms."""
    if not isinstance(thresholds, dict):
        return "type", None
    for label, cut in thresholds.items():
        if label not in labels:
            return "label", label
        if isinstance(cut, bool) or not isinstance(cut, int | float) or not 0 <= cut <= 1:
            return "value", label
    return None


def label_constraint(choice: LabelChoice) -> dict[str, Any]:
    """The request field that asks for any subset of the labels, label by label (this project's
    extension ``label_choice``)."""
    return choice.to_request()


def _label_choice(req: Mapping[str, Any]) -> LabelChoice | None:
    value = req.get("label_choice")
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"labels", "label_format", "thresholds"}:
        raise bad("label_choice takes labels, label_format and thresholds", "label_choice", "invalid_type")
    labels = value.get("labels")
    if (
        not isinstance(labels, list)
        or not 1 <= len(labels) <= MAX_CHOICES
        or not all(isinstance(x, str) and x.strip() for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise bad(
            f"label_choice.labels must be 1 to {MAX_CHOICES} distinct labels", "label_choice.labels", "invalid_type"
        )
    style = value.get("label_format", "seed")
    if style not in LABEL_FORMATS:
        raise bad(f"label_choice.label_format must be one of {', '.join(LABEL_FORMATS)}", "label_choice.label_format")
    thresholds = value.get("thresholds")
    if thresholds is not None:
        problem = threshold_problem(thresholds, labels)
        if problem is not None:
            kind, label = problem
            where = f"label_choice.thresholds.{label}"
            if kind == "type":
                raise bad(
                    "label_choice.thresholds maps labels to probabilities", "label_choice.thresholds", "invalid_type"
                )
            if kind == "label":
                raise bad(f"{label!r} in label_choice.thresholds is not one of the labels", where)
            raise bad(f"{where} must be a probability from 0 to 1", where, "invalid_type")
        thresholds = {str(k): float(v) for k, v in thresholds.items()}
    for key in ("guided_choice", "structured_outputs", "stop"):
        if req.get(key):
            raise bad(f"{key} cannot be combined with label_choice", key, "unsupported_value")
    if (req.get("n") or 1) > 1:
        raise bad("label_choice gives one answer: n must be 1", "n", "unsupported_value")
    return LabelChoice(tuple(labels), style, thresholds)


def _choices(req: Mapping[str, Any]) -> Any:
    """The candidate answers of a request: ``structured_outputs.choice`` or ``guided_choice``."""
    structured = req.get("structured_outputs")
    legacy = req.get("guided_choice")
    if structured is None:
        return legacy
    if not isinstance(structured, dict):
        raise bad("structured_outputs must be an object", "structured_outputs", "invalid_type")
    other = sorted(set(structured) - {"choice"})
    if other:  # json, regex, grammar, ...: not what this engine constrains to
        raise bad(
            f"structured_outputs.{other[0]} is not supported; this server constrains answers to a choice only",
            f"structured_outputs.{other[0]}",
            "unsupported_parameter",
        )
    if legacy is not None and legacy != structured.get("choice"):
        raise bad("give structured_outputs.choice or guided_choice, not both", "guided_choice", "invalid_value")
    return structured.get("choice")


# fields accepted only with the value that changes nothing (clients send them by default)
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: v in (None, {}),
    "user": lambda v: v is None or isinstance(v, str),
    "safety_identifier": lambda v: v is None or isinstance(v, str),
    "prompt_cache_key": lambda v: v is None or isinstance(v, str),
    "metadata": lambda v: v is None or isinstance(v, dict),
    "store": lambda v: v in (None, False),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none", "auto"),
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "service_tier": lambda v: v in (None, "auto", "default"),
    "modalities": lambda v: v in (None, ["text"]),
}
SUPPORTED = frozenset(CHAT_FIELDS) | frozenset(SHAPED)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty array", "messages", "invalid_type")
    if len(value) > MAX_MESSAGES:
        raise bad(f"messages holds {len(value):,} messages; at most {MAX_MESSAGES:,} are accepted", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(
                f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}"
                + (" (tools are not supported)" if role in ("tool", "function") else ""),
                f"{where}.role",
            )
        for key in m:
            if key in ("role", "content", "name"):
                continue
            if key in ("tool_calls", "function_call", "audio", "refusal") and m[key] in (None, []):
                continue
            raise bad(f"{where}.{key} is not supported", f"{where}.{key}", "unsupported_parameter")
        if "name" in m and not isinstance(m["name"], str):
            raise bad(f"{where}.name must be a string", f"{where}.name", "invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad("only text content parts are supported", f"{where}.content[{j}]", "unsupported_parameter")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string or text parts", f"{where}.content", "invalid_type")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: not text a tokenizer can read
            raise bad(
                f"{where}.content is not valid text (a lone surrogate)", f"{where}.content", "invalid_value"
            ) from None
        # the chat templates know no "developer": it is the system message of newer models
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_chat(req: Any) -> dict[str, Any]:
    """The checked request, as the engine takes it (plus ``model``, ``stream``, ``include_usage``)."""
    if not isinstance(req, dict):
        raise bad("the request body must be a JSON object", "body", "invalid_type")
    for key, value in req.items():
        if key in SUPPORTED:
            continue
        if key in NEUTRAL:
            if not NEUTRAL[key](value):
                raise bad(f"{key}={value!r} is not supported by this server", key, "unsupported_value")
            continue
        raise bad(f"unknown or unsupported field: {key}", key, "unsupported_parameter")
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model must be a model id", "model", "invalid_type")
    v = {key: checked(spec, req.get(key), key) for key, spec in CHAT_FIELDS.items()}
    if v["max_tokens"] is not None and v["max_completion_tokens"] is not None:
        if v["max_tokens"] != v["max_completion_tokens"]:
            raise bad("give max_completion_tokens or max_tokens, not both", "max_tokens")
    stop = req.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP:
        stops = list(stop)
    else:
        raise bad(f"stop must be a string or up to {MAX_STOP} strings", "stop", "invalid_type")
    logprobs = bool(v["logprobs"])
    top = v["top_logprobs"] or 0
    if top and not logprobs:
        raise bad("top_logprobs needs logprobs=true", "top_logprobs")
    stream = bool(v["stream"])
    options = req.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed with stream=true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
            raise bad("stream_options supports include_usage only", "stream_options", "unsupported_parameter")
        if options.get("include_obfuscation"):
            raise bad("include_obfuscation is not supported", "stream_options.include_obfuscation", "unsupported_value")
    choices = _choices(req)
    if choices is not None:
        field = "guided_choice" if req.get("structured_outputs") is None else "structured_outputs.choice"
        if (
            not isinstance(choices, list)
            or not 1 <= len(choices) <= MAX_CHOICES
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise bad(f"{field} must be 1 to {MAX_CHOICES} non-empty strings", field, "invalid_type")
        if req.get("stop"):  # logprobs are the candidates' (the chosen one's and the most likely)
            raise bad(f"stop cannot be combined with {field}", "stop", "unsupported_value")
        if (v["n"] or 1) > 1:
            raise bad(f"{field} gives one answer: n must be 1", "n", "unsupported_value")
    temperature, top_p = v["temperature"], v["top_p"]
    return {
        "model": model,
        "choices": list(choices) if choices else None,
        "label_choice": _label_choice(req),
        "messages": _messages(req.get("messages")),
        "max_tokens": v["max_completion_tokens"] or v["max_tokens"],
        "temperature": float(temperature) if temperature is not None else None,
        "top_p": float(top_p) if top_p is not None else None,
        "stop": stops,
        "seed": v["seed"],
        "n": v["n"] or 1,
        "logprobs": logprobs,
        "top_logprobs": top,
        "stream": stream,
        "include_usage": bool((options or {}).get("include_usage")),
    }


def chat_schema() -> dict[str, Any]:
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": list(ROLES)},
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
    plain = {key: spec.json_schema() for key, spec in CHAT_FIELDS.items()}
    choice = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_CHOICES}
    return {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": message},
            **plain,
            "stop": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP},
                    {"type": "null"},
                ]
            },
            "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
            "presence_penalty": {"type": ["number", "null"], "enum": [0, None]},
            "frequency_penalty": {"type": ["number", "null"], "enum": [0, None]},
            "user": {"type": "string"},
            "guided_choice": choice,
            "label_choice": {
                "type": "object",
                "required": ["labels"],
                "properties": {
                    "labels": {**choice, "uniqueItems": True},
                    "label_format": {"type": "string", "enum": list(LABEL_FORMATS)},
                    "thresholds": {
                        "type": "object",
                        "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1},
                        "description": "label -> probability a label needs to be in the answer (0.5 if not listed)",
                    },
                },
                "additionalProperties": False,
                "description": "answer with any subset of these labels, chosen label by label, in this format",
            },
            "structured_outputs": {
                "type": "object",
                "properties": {"choice": choice},
                "additionalProperties": False,
                "description": "answer with the most likely of these strings (vLLM's field; guided_choice is its old name)",
            },
        },
    }


def body_doc(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
