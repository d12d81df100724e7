"""``prepare`` (the seed's data_process.py), ``validate`` and ``stats``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..contract import DEFAULT_MAX_LENGTH
from ..data.analysis import FileReport, analyze_file
from ..data.checks import Finding
from ..data.convert import RECORD_FORMATS, ConvertOptions
from ..data.labels import LABEL_FORMATS
from ..data.prepare import prepare
from ..data.stats import stats_dict
from ..errors import ConfigError, DataError, DependencyError
from .common import add_config_flag, info, settings_from, typed
from .stdio import STDIO, Spool, spooled


def add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-i",
        "--input",
        required=True,
        metavar="FILE",
        help="raw data: seed JSON/JSONL, Alpaca, chat JSONL, CSV/TSV ('-': standard input)",
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="chat JSONL to write (atomically; '-': standard output)"
    )
    add_config_flag(p)
    p.add_argument(
        "--format", choices=("auto", *RECORD_FORMATS), default="auto", help="record format (default: detect)"
    )
    p.add_argument("--sys-prompt", dest="sys_prompt", metavar="TEXT", help="system message for records without one")
    p.add_argument(
        "--task-type", dest="task_type", type=typed("task_type"), help="answering (default) or classification"
    )
    p.add_argument(
        "--label-format", dest="label_format", choices=LABEL_FORMATS, help="how labels are written (default: seed)"
    )
    p.add_argument("--split", type=float, metavar="FRACTION", help="also write a validation file with this fraction")
    p.add_argument("--seed", type=typed("seed"), default=None, help="random seed for --split (default 0)")
    p.add_argument(
        "--validation-output", metavar="FILE", help="where --split writes (default: OUTPUT with .valid.jsonl)"
    )
    p.add_argument("--prompt-columns", metavar="A,B", help="CSV/TSV: columns that make the user message")
    p.add_argument("--label-column", metavar="COL", help="CSV/TSV: the answer column")
    p.add_argument("--system-column", metavar="COL", help="CSV/TSV: a per-row system prompt column")
    p.add_argument(
        "--workers", type=typed("limit", "--workers"), default=0, help="worker processes (default: one per core)"
    )
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(ns: argparse.Namespace) -> int:
    s = settings_from(ns)
    if ns.output == STDIO and ns.split and not ns.validation_output:
        raise ConfigError("--split with -o - needs --validation-output FILE (there is no file name to derive it from)")
    with spooled() as spool:
        return _prepare(ns, s, spool)


def _prepare(ns: argparse.Namespace, s: Any, spool: Spool) -> int:
    opts = ConvertOptions(
        sys_prompt=s.sys_prompt,
        task_type=s.task_type or "answering",
        label_format=s.label_format or "seed",
        prompt_columns=[c.strip() for c in ns.prompt_columns.split(",")] if ns.prompt_columns else (),
        label_column=ns.label_column,
        system_column=ns.system_column,
    )
    result = prepare(
        spool.stdin(ns.input, ".csv" if ns.format == "csv" else ""),
        spool.stdout(ns.output),
        options=opts,
        record_format=ns.format,
        split=ns.split,
        seed=s.seed or 0,
        validation_output=ns.validation_output,
        workers=ns.workers,
    )
    spool.flush()
    output = spool.shown(result.output)
    if result.validation_output:
        info(
            f"Wrote {result.n_train} training examples to {output} and "
            f"{result.n_valid} validation examples to {result.validation_output} ({result.record_format} input)"
        )
    else:
        info(f"Wrote {result.n_examples} examples to {output} ({result.record_format} input)")
    if result.labels_path:
        top = ", ".join(f"{k} {v}" for k, v in result.label_counts.most_common(8))
        where = result.labels_path if ns.output != STDIO else "not saved (the output is standard output)"
        info(f"{len(result.label_counts)} labels ({top}{', ...' if len(result.label_counts) > 8 else ''}) -> {where}")
    return 0


def add_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="chat JSONL training file ('-': standard input)")
    p.add_argument("--model", default=None, help="target OpenAI model, for token limits (default gpt-3.5-turbo)")
    p.add_argument("--validation-file", metavar="FILE", help="also check this file, and label drift between the two")
    p.add_argument("--json", action="store_true", help="print findings as JSON")
    p.add_argument(
        "--workers", type=typed("limit", "--workers"), default=0, help="worker processes (default: one per core)"
    )
    p.set_defaults(func=cmd_validate)


def label_drift(train: FileReport, valid: FileReport) -> list[Finding]:
    """Labels of a validation file the training file never teaches, and the reverse."""
    if not train.label_counts or not valid.label_counts:
        return []
    findings = []
    unseen = sorted(set(valid.label_counts) - set(train.label_counts))
    if unseen:
        findings.append(
            Finding(
                "warning",
                "label_drift",
                None,
                None,
                f"validation labels never seen in training: {', '.join(unseen)}",
                valid.path,
            )
        )
    missing = sorted(set(train.label_counts) - set(valid.label_counts))
    if missing:
        findings.append(
            Finding(
                "warning",
                "label_drift",
                None,
                None,
                f"training labels absent from validation: {', '.join(missing)}",
                valid.path,
            )
        )
    n_t, n_v = sum(train.label_counts.values()), sum(valid.label_counts.values())
    shares = {
        k: (train.label_counts.get(k, 0) / n_t, valid.label_counts.get(k, 0) / n_v)
        for k in set(train.label_counts) | set(valid.label_counts)
    }
    tvd = 0.5 * sum(abs(a - b) for a, b in shares.values())
    if tvd > 0.2:
        worst = max(shares, key=lambda k: abs(shares[k][0] - shares[k][1]))
        a, b = shares[worst]
        findings.append(
            Finding(
                "warning",
                "label_drift",
                None,
                None,
                f"label distributions differ by {tvd:.0%} (total variation); "
                f"largest: {worst} is {a:.0%} of training labels, {b:.0%} of validation",
                valid.path,
            )
        )
    return findings


def cmd_validate(ns: argparse.Namespace) -> int:
    with spooled() as spool:
        reports = [_shown(analyze_file(spool.stdin(ns.file), ns.model, workers=ns.workers), spool)]
        if ns.validation_file:
            valid = analyze_file(spool.stdin(ns.validation_file), ns.model, workers=ns.workers)
            reports.append(_shown(valid, spool))
    extra: list[Finding] = label_drift(reports[0], reports[1]) if len(reports) == 2 else []
    findings = [f for r in reports for f in r.findings] + extra
    n_errors = sum(r.n_errors for r in reports)
    n_warnings = sum(n for r in reports for k, n in r.finding_counts.items() if k.startswith("warning:")) + len(extra)
    if ns.json:
        print(
            json.dumps(
                {
                    "ok": n_errors == 0,
                    "files": [
                        {
                            "file": r.path,
                            "n_examples": r.n_examples,
                            "n_lines": r.n_lines,
                            "counts": dict(r.finding_counts),
                        }
                        for r in reports
                    ],
                    "findings": [f.as_dict() for f in findings],
                },
                indent=1,
            )
        )
    else:
        for f in findings:
            print(format_finding(f))
        for r in reports:
            hidden = {k: n - 100 for k, n in r.finding_counts.items() if n > 100}
            for k, n in hidden.items():
                print(f"{r.path}: ... and {n} more {k.split(':')[1]} findings")
        verdict = "OK" if n_errors == 0 else "FAILED"
        names = " and ".join(f"{r.path} ({r.n_examples} examples)" for r in reports)
        print(f"{verdict}: {names}: {n_errors} errors, {n_warnings} warnings")
    return 0 if n_errors == 0 else 1


def _shown(report: FileReport, spool: Spool) -> FileReport:
    """The report with ``<stdin>`` in place of standard input's temporary copy."""
    report.path = spool.shown(report.path)
    for f in report.findings:
        f.path = spool.shown(f.path)
    return report


def format_finding(f: Finding) -> str:
    place = f.path or ""
    if f.line is not None:
        place += f":{f.line}"
    if f.field:
        place += f": {f.field}"
    return f"{place}: {f.severity} [{f.code}]: {f.message}"


def add_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="chat JSONL file ('-': standard input)")
    p.add_argument("--model", default=None, help="OpenAI model for encoding, limits and price (default gpt-3.5-turbo)")
    p.add_argument(
        "--n-epochs", dest="n_epochs", type=typed("n_epochs"), help="epochs for the cost (default: OpenAI's rule)"
    )
    p.add_argument(
        "--local-model",
        metavar="ID",
        default=None,
        help="also count tokens with this local model's tokenizer (default: the default local model, when installed)",
    )
    p.add_argument("--no-local", action="store_true", help="skip the local tokenizer count")
    p.add_argument(
        "--max-length",
        type=typed("max_length"),
        default=None,
        help=f"the local trainer's max_length, for the count of examples it shortens (default {DEFAULT_MAX_LENGTH})",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--workers", type=typed("limit", "--workers"), default=0, help="worker processes (default: one per core)"
    )
    p.set_defaults(func=cmd_stats)


def cmd_stats(ns: argparse.Namespace) -> int:
    counter = None if ns.no_local else _local_counter(ns)
    with spooled() as spool:
        report = _shown(analyze_file(spool.stdin(ns.file), ns.model, workers=ns.workers, local=counter), spool)
    if report.n_examples == 0:
        raise DataError("no valid examples to count", path=ns.file, hint=f"run: gpt-finetune validate {ns.file}")
    out = stats_dict(report, ns.n_epochs)
    if counter is not None and report.local is not None:
        from ..local.tokenizer import summarize

        out["local"] = summarize(counter, report.local, ns.max_length)
    if ns.json:
        print(json.dumps(out, indent=1))
        return 0
    print(render_stats(out))
    return 0


def _local_counter(ns: argparse.Namespace) -> Any:
    """The local model's token counter, or None where the local engine is not installed."""
    try:
        from ..local.tokenizer import local_counter
    except ImportError:
        return None
    try:
        return local_counter(ns.local_model, home=getattr(ns, "home", None))
    except (ImportError, DependencyError) as exc:
        info(f"(local token count skipped: {exc})")
        return None


def render_stats(s: dict[str, Any]) -> str:
    t, m, job = s["tokens_per_example"], s["messages_per_example"], s["job"]
    lines = [
        f"{s['file']}: {s['n_examples']} "
        + ("preference pairs (method dpo)" if s.get("kind") == "preference" else "examples")
        + (f" ({s['n_errors']} lines with errors skipped)" if s["n_errors"] else ""),
        f"Tokens ({s['model']}, {s['encoding']}): total {s['total_tokens']:,}, assistant {s['assistant_tokens']:,}",
        f"  per example: min {t['min']}, mean {t['mean']}, p50 {t['p50']}, p95 {t['p95']}, max {t['max']}",
        f"  over the {s['example_token_limit']:,}-token limit: {s['n_over_token_limit']}",
        f"Messages per example: min {m['min']}, mean {m['mean']}, p50 {m['p50']}, p95 {m['p95']}, max {m['max']}",
    ]
    if s.get("labels"):
        total = sum(s["labels"].values())
        lines.append(f"Labels ({len(s['labels'])}):")
        width = max(len(k) for k in s["labels"])
        for label, n in s["labels"].items():
            lines.append(f"  {label:<{width}}  {n:>6}  {n / total:6.1%}  {'#' * max(1, round(30 * n / total))}")
    cost = (
        "unknown price" if job["cost_usd"] is None else f"${job['cost_usd']:,.2f} at ${job['price_per_million_usd']}/1M"
    )
    lines.append(
        f"OpenAI job: {job['n_epochs']} epochs ({job['epochs_rule']}), {job['billed_tokens']:,} billed tokens, {cost}"
    )
    if s.get("kind") == "preference":
        lines.append(
            "  (a pair counted as its prompt once plus both outputs: an assumption, OpenAI does not publish how "
            "it bills a DPO pair)"
        )
    local = s.get("local")
    if local:
        d = local["tokens_per_example"]
        lines.append(
            f"Local model {local['model']}: {local['total_tokens']:,} tokens "
            f"(per example mean {d['mean']}, p95 {d['p95']}, max {d['max']}; {local['assistant_tokens']:,} trained)"
        )
        if local["n_truncated"] or local["n_too_long"]:
            lines.append(
                f"  over max_length {local['max_length']}: {local['n_truncated']} will have their prompt shortened"
                + (f", {local['n_too_long']} dropped (answers alone too long)" if local["n_too_long"] else "")
            )
    return "\n".join(lines)
