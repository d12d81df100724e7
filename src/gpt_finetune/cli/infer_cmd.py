"""``infer`` (the seed's infer.py) and ``chat``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..backends.base import Backend, chat_text
from ..contract import MAX_TOP_LOGPROBS, UNSUCCESSFUL, JobStatus, LabelChoice
from ..errors import BackendError, ConfigError
from ..request_rules import choice_constraint, ignored_constraint, label_constraint, threshold_problem
from .common import add_config_flag, add_connection_flags, get_backend, settings_from, typed, warn


def add_infer(p: argparse.ArgumentParser) -> None:
    add_config_flag(p)
    add_connection_flags(p)
    p.add_argument("-m", "--model", dest="model", help="model id: fine-tuned, checkpoint or base")
    p.add_argument("-j", "--job", dest="ft_job_id", metavar="JOB_ID", help="use the model this fine-tuning job made")
    p.add_argument("-q", "--question", dest="user_input", metavar="TEXT", help="the question (user message)")
    p.add_argument("-s", "--sys-prompt", dest="sys_prompt", metavar="TEXT", help="system prompt")
    p.add_argument("--max-tokens", dest="max_tokens", type=typed("max_tokens"), help="longest answer in tokens")
    p.add_argument("-t", "--temperature", dest="temperature", type=typed("temperature"), help="0 (greedy) to 2")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument(
        "--labels",
        dest="infer_labels",
        metavar="FILE",
        help="answer with one of these labels (prepare's .labels.json or a JSON list), scored as the model "
        "was trained to write them (label-constrained; local models and this project's server)",
    )
    p.add_argument(
        "--each-label",
        action="store_true",
        help="with --labels: answer with any subset of the labels, chosen label by label (multi-label data; "
        "this project's engine and server)",
    )
    p.add_argument(
        "--confidence",
        action="store_true",
        help="with --labels: also show how likely each label is (on stderr; the answer stays alone on stdout)",
    )
    p.add_argument(
        "--thresholds",
        metavar="FILE",
        help="with --each-label: per-label probability thresholds (JSON label -> probability, or the "
        "thresholds.json that eval --tune-on writes); a label is answered where it reaches its threshold",
    )
    b = p.add_argument_group("batch (OpenAI's Batch API line format, or chat JSONL)")
    b.add_argument("--input", dest="batch_input", metavar="FILE", help="requests, one per line")
    b.add_argument("--output", dest="batch_output", metavar="FILE", help="results (resumable: rerun to finish)")
    b.add_argument("--concurrency", type=int, default=None, help="requests at once (default 4; 1 for local)")
    p.set_defaults(func=cmd_infer)


def label_file(path: str) -> tuple[list[str], str]:
    """The labels of a label file and their format (prepare's sidecar says which; else seed)."""
    import json

    try:
        info = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--labels {path}: {exc}") from None
    labels = info.get("labels") if isinstance(info, dict) else info
    style = info.get("label_format", "seed") if isinstance(info, dict) else "seed"
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ConfigError(f"--labels {path}: expected a list of labels (or prepare's .labels.json)")
    return labels, style


def read_thresholds(path: str, labels: list[str]) -> dict[str, float]:
    """Per-label thresholds: a JSON object label -> probability, or eval's thresholds.json."""
    import json

    try:
        info = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--thresholds {path}: {exc}") from None
    if isinstance(info, dict) and isinstance(info.get("thresholds"), dict):
        info = info["thresholds"]
    problem = threshold_problem(info, labels)
    if problem is not None:
        kind, label = problem
        if kind == "type":
            raise ConfigError(f"--thresholds {path}: expected a JSON object of label -> probability")
        if kind == "label":
            raise ConfigError(f"--thresholds {path}: {label!r} is not one of the --labels")
        raise ConfigError(f"--thresholds {path}: {label}: {info[label]!r} is not a probability from 0 to 1")
    return {str(k): float(v) for k, v in info.items()}


def each_label(ns: argparse.Namespace) -> LabelChoice | None:
    """The label-by-label request of ``--labels FILE --each-label`` (with ``--thresholds``)."""
    if not (ns.infer_labels and ns.each_label):
        if getattr(ns, "thresholds", None):
            raise ConfigError("--thresholds is for label-by-label answers: add --labels FILE --each-label")
        return None
    labels, style = label_file(ns.infer_labels)
    thresholds = read_thresholds(ns.thresholds, labels) if ns.thresholds else None
    return LabelChoice(tuple(labels), style, thresholds)


def label_request(ns: argparse.Namespace) -> tuple[list[str] | None, dict[str, Any], dict[str, Any]]:
    """What ``--labels`` (with ``--each-label``, ``--thresholds``, ``--confidence``) adds to a
    request: the candidate label sets (None label by label or without --labels), the constraint
    for ``extra_body``, and the logprobs fields that carry the answer's probabilities."""
    choices = label_choices(ns.infer_labels) if ns.infer_labels and not ns.each_label else None
    by_label = each_label(ns)
    constraint = label_constraint(by_label) if by_label else choice_constraint(choices) if choices else {}
    probe: dict[str, Any] = {}
    if ns.confidence:
        if not constraint:
            raise ConfigError("--confidence needs --labels FILE")
        n = len(by_label.labels) if by_label else len(choices or [])
        probe = {"logprobs": True, "top_logprobs": min(n, MAX_TOP_LOGPROBS)}
    return choices, constraint, probe


def label_choices(path: str) -> list[str]:
    """Each label of a label file, written in its label format (the sidecar says which)."""
    from ..data.labels import format_labels

    labels, style = label_file(path)
    return [format_labels([x], style) for x in labels]


def cmd_batch(ns: argparse.Namespace, backend: Backend, model: str | None) -> int:
    from tqdm import tqdm

    from ..batch import run_batch
    from .eval_cmd import default_batch

    if not ns.batch_output:
        raise ConfigError("--input needs --output FILE")
    choices, constraint, probe = label_request(ns)

    def chat(body: dict[str, Any]) -> dict[str, Any]:
        if body.get("stream"):
            raise BackendError("stream is not supported in batch requests", param="body.stream")
        body = {**body, **probe}
        if constraint:
            body["extra_body"] = {**(body.get("extra_body") or {}), **constraint}
        response: Any = backend.chat(**body)
        if choices and (error := ignored_constraint(response.choices[0].message.content or "", choices)):
            raise error
        return response.model_dump(mode="json", exclude_unset=True)  # type: ignore[no-any-return]

    def chat_many(bodies: list[dict[str, Any]]) -> list[Any]:
        """Greedy lines answered several at a time, where the backend batches (local models)."""
        out: list[Any] = [None] * len(bodies)
        todo = []
        for i, body in enumerate(bodies):
            if body.get("stream"):
                out[i] = BackendError("stream is not supported in batch requests", param="body.stream")
            else:
                todo.append((i, {**body, **constraint, **probe}))
        for (i, _), answer in zip(todo, backend.chat_many([b for _, b in todo]), strict=True):
            out[i] = answer
        return out

    bar = tqdm(unit="req", file=sys.stderr, dynamic_ncols=True, desc="batch")
    concurrency = ns.concurrency or backend.traits.concurrency

    def start(total: int, skipped: int) -> None:
        bar.reset(total=total - skipped)
        if skipped:
            bar.write(f"Resuming: {skipped} of {total} lines are done already", file=sys.stderr)

    try:
        result = run_batch(
            chat,
            ns.batch_input,
            ns.batch_output,
            model=model,
            concurrency=concurrency,
            progress=bar.update,
            on_start=start,
            chat_many=chat_many if backend.traits.batched_chat else None,
            group=default_batch(),
        )
    finally:
        bar.close()
    print(
        f"Wrote {ns.batch_output}: {result.succeeded} answered, {result.failed} failed"
        + (f" ({result.skipped} from an earlier run)" if result.skipped else ""),
        file=sys.stderr,
    )
    return 1 if result.failed else 0


def resolve_model(backend: Backend, model: str | None, job_id: str | None) -> str:
    """The model to call: ``model`` if given, else the one job ``job_id`` produced."""
    if model:
        return model
    if not job_id:
        raise ConfigError(
            "no model to ask",
            hint="pass --model MODEL or --job JOB_ID (or set model / ft_job_id in the -c config file)",
        )
    job = backend.retrieve_job(job_id)
    if job.status != JobStatus.SUCCEEDED or not job.fine_tuned_model:
        detail = f" ({job.error.message})" if job.error is not None and job.error.message else ""
        raise BackendError(
            f"job {job_id} is {job.status}{detail}; it has no fine-tuned model yet",
            hint=f"follow it with: gpt-finetune jobs wait {job_id}" if job.status not in UNSUCCESSFUL else None,
            code="job_not_ready",
        )
    return str(job.fine_tuned_model)


def cmd_infer(ns: argparse.Namespace) -> int:
    s = settings_from(ns)
    if ns.batch_input:
        backend = get_backend(s, announce=False)
        model = resolve_model(backend, s.model, s.ft_job_id) if (s.model or s.ft_job_id) else None
        return cmd_batch(ns, backend, model)
    question = s.user_input
    if question is None and not sys.stdin.isatty():
        question = sys.stdin.read().strip() or None
    if not question:
        raise ConfigError("no question", hint="pass -q TEXT, set user_input in the -c config file, or pipe it on stdin")
    backend = get_backend(s, announce=False)
    # a model named explicitly (flag, or config when no job is given) wins over the job
    model = resolve_model(
        backend, s.model if (s.origin("model") == "command line" or not s.ft_job_id) else None, s.ft_job_id
    )
    messages = ([{"role": "system", "content": s.sys_prompt}] if s.sys_prompt else []) + [
        {"role": "user", "content": question}
    ]
    choices, constraint, probe = label_request(ns)
    if ns.confidence and ns.stream:
        raise ConfigError("--confidence shows the answer's probabilities once it is whole: drop --stream")
    extra: dict[str, Any] = {**({"extra_body": constraint} if constraint else {}), **probe}
    response: Any = backend.chat(
        model=model,
        messages=messages,
        max_tokens=None if extra else s.max_tokens,
        temperature=s.temperature,
        stream=ns.stream,
        **extra,
    )
    pieces = []
    for piece in chat_text(response, stream=ns.stream):
        pieces.append(piece)
        sys.stdout.write(piece)
        if ns.stream:
            sys.stdout.flush()
    sys.stdout.write("\n")
    if choices and (error := ignored_constraint("".join(pieces), choices)):
        warn(f"{error.message}; it is not a label-constrained answer")
    elif ns.confidence:
        import math

        content = response.choices[0].logprobs.content if response.choices[0].logprobs else None
        if not content:
            warn("the server returned no logprobs: no confidences to show")
        else:
            if ns.each_label:  # the answer's probability, then each label's chance of belonging in it
                print(f"{math.exp(content[0].logprob):7.3f}  (this answer)", file=sys.stderr)
            for top in content[0].top_logprobs:
                print(f"{math.exp(top.logprob):7.3f}  {top.token}", file=sys.stderr)
    return 0


def add_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="model id (or use --job)")
    add_config_flag(p)
    add_connection_flags(p)
    p.add_argument("-j", "--job", dest="ft_job_id", metavar="JOB_ID")
    p.add_argument("-s", "--sys-prompt", dest="sys_prompt", metavar="TEXT")
    p.add_argument("--max-tokens", dest="max_tokens", type=typed("max_tokens"))
    p.add_argument("-t", "--temperature", dest="temperature", type=typed("temperature"))
    p.set_defaults(func=cmd_chat)


def cmd_chat(ns: argparse.Namespace) -> int:
    ns_model = ns.model
    del ns.model
    s = settings_from(ns)
    backend = get_backend(s)
    model = resolve_model(backend, ns_model or s.model, s.ft_job_id)
    history: list[dict[str, Any]] = [{"role": "system", "content": s.sys_prompt}] if s.sys_prompt else []
    print(f"Chatting with {model}. Empty line or Ctrl-D ends; /reset forgets the conversation.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not text.strip():
            return 0
        if text.strip() == "/reset":
            history = history[:1] if s.sys_prompt else []
            continue
        history.append({"role": "user", "content": text})
        answer = []
        response = backend.chat(
            model=model, messages=history, max_tokens=s.max_tokens, temperature=s.temperature, stream=True
        )
        for piece in chat_text(response, stream=True):
            answer.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
