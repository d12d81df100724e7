"""One streaming pass over a chat JSONL file: findings for ``validate``, numbers for ``stats``.

Lines are checked in worker processes (JSON decoding and token encoding dominate); the parent
keeps only counters, one 4-byte token count and one 8-byte fingerprint per example, and at most
:data:`MAX_FINDINGS_PER_CODE` findings of each kind, so memory stays flat at any size.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..openai_facts import ModelInfo, model_info
from . import local_tokens
from .checks import ChunkResult, Finding, check_block
from .labels import LabelError, parse_labels
from .local_tokens import LocalCounter, LocalCounts
from .parallel import PARALLEL_MIN_BYTES, parallel_map
from .readers import iter_blocks, sniff
from .tokens import get_encoding

MIN_EXAMPLES = 10  # OpenAI rejects fewer (invalid_n_examples)
MAX_FINDINGS_PER_CODE = 100
MAX_DISTINCT_ANSWERS = 1000  # more distinct answers than this: not a classification file


@dataclass
class FileReport:
    path: str
    model: ModelInfo
    n_lines: int = 0
    n_examples: int = 0  # lines that parsed as examples with no error
    findings: list[Finding] = field(default_factory=list)
    finding_counts: Counter[str] = field(default_factory=Counter)
    tokens: array = field(default_factory=lambda: array("i"))  # per usable example
    assistant_tokens: int = 0
    messages: array = field(default_factory=lambda: array("I"))
    answers: Counter[str] | None = field(default_factory=Counter)
    label_counts: Counter[str] | None = None
    local: LocalCounts | None = None  # counts with a local model's tokenizer, when asked
    first_line: dict[str, int] = field(default_factory=dict)  # "chat" / "preference" -> first line of that kind

    @property
    def kind(self) -> str:
        """What the file holds: ``preference`` pairs (DPO) or ``chat`` examples (the first line's)."""
        if not self.first_line:
            return "chat"
        return min(self.first_line, key=lambda k: self.first_line[k])

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def n_errors(self) -> int:
        return sum(n for key, n in self.finding_counts.items() if key.startswith("error:"))

    def add(self, finding: Finding) -> None:
        finding.path = self.path
        key = f"{finding.severity}:{finding.code}"
        self.finding_counts[key] += 1
        if self.finding_counts[key] <= MAX_FINDINGS_PER_CODE:
            self.findings.append(finding)


def analyze_file(
    path: str | Path,
    model: str | None = None,
    *,
    count_tokens: bool = True,
    workers: int = 0,
    local: LocalCounter | None = None,
) -> FileReport:
    """Check every line of a chat JSONL file. Raises DataError only when the file as a whole is
    unusable (missing, empty, a JSON array); per-line problems become findings. With ``local``,
    the same pass also counts tokens with that local tokenizer."""
    p = Path(path)
    container = sniff(p)
    if container != "jsonl":
        raise DataError(
            "is a JSON array or pretty-printed JSON, not JSONL (one JSON object per line)"
            if container == "json"
            else f"is {container.upper()}, not JSONL",
            path=p,
            line=1,
            hint="convert it with: gpt-finetune prepare -i FILE -o out.jsonl",
        )
    info = model_info(model)
    report = FileReport(str(p), info)
    size = p.stat().st_size
    if workers == 0 and size < PARALLEL_MIN_BYTES:
        workers = 1
    fingerprints = array("Q")
    fp_lines = array("I")
    encoding = info.encoding if count_tokens else None
    if encoding is not None and workers != 1:
        get_encoding(encoding)  # load once here; forked workers share it
    local_tokens.ACTIVE = local  # forked workers inherit it
    if local is not None:
        report.local = LocalCounts()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one worker per core already
    try:
        for chunk in parallel_map(check_block, iter_blocks(p), encoding, str(p), local is not None, workers=workers):
            _merge(report, chunk, encoding is not None, fingerprints, fp_lines)
    finally:
        local_tokens.ACTIVE = None
    _find_duplicates(report, fingerprints, fp_lines)
    if len(report.first_line) > 1:
        other = max(report.first_line, key=lambda k: report.first_line[k])
        report.add(
            Finding(
                "error",
                "mixed_example_kinds",
                report.first_line[other],
                None,
                f"a {'preference pair' if other == 'preference' else 'chat example'}, but line "
                f"{report.first_line[report.kind]} is a {'preference pair' if report.kind == 'preference' else 'chat example'}: "
                "a file holds one kind (chat examples train with method supervised, preference pairs with dpo)",
            )
        )
        report.findings.sort(key=lambda f: f.line or 0)
    if report.n_examples < MIN_EXAMPLES and not report.n_errors:
        report.add(
            Finding(
                "error",
                "invalid_n_examples",
                None,
                None,
                f"{report.n_examples} examples; OpenAI requires at least {MIN_EXAMPLES}",
            )
        )
    report.label_counts = _label_counts(p, report)
    return report


def _merge(report: FileReport, chunk: ChunkResult, counted: bool, fingerprints: array, fp_lines: array) -> None:
    info = report.model
    limit = info.example_token_limit
    report.n_lines += chunk.n_lines
    report.n_examples += len(chunk.lines)
    for f in chunk.findings:
        report.add(f)
    if counted:
        report.tokens.extend(chunk.tokens)
        report.assistant_tokens += chunk.assistant_tokens
        if max(chunk.tokens, default=0) > limit:
            for line, n in zip(chunk.lines, chunk.tokens):
                if n > limit:
                    report.add(
                        Finding(
                            "warning",
                            "too_many_tokens",
                            line,
                            "messages",
                            f"{n} tokens, over {info.name}'s limit of {limit}: OpenAI truncates it to the limit",
                        )
                    )
    report.messages.extend(chunk.messages)
    for kind, line in chunk.first_line.items():
        report.first_line.setdefault(kind, line)
    fingerprints.extend(chunk.fingerprints)
    fp_lines.extend(chunk.lines)
    if report.answers is not None:
        if chunk.unanswered:
            report.answers = None
        else:
            report.answers.update(chunk.answers)
            if len(report.answers) > MAX_DISTINCT_ANSWERS:
                report.answers = None
    if report.local is not None and chunk.local is not None:
        report.local.tokens.extend(chunk.local.tokens)
        report.local.fixed.extend(chunk.local.fixed)
        report.local.assistant += chunk.local.assistant


def _find_duplicates(report: FileReport, fingerprints: array, lines: array) -> None:
    if len(fingerprints) < 2:
        return
    import numpy as np

    fps = np.frombuffer(fingerprints, dtype=np.uint64)
    order = np.argsort(fps, kind="stable")
    sorted_fps = fps[order]
    n = len(sorted_fps)
    is_start = np.ones(n, dtype=bool)
    is_start[1:] = sorted_fps[1:] != sorted_fps[:-1]
    run_start = np.maximum.accumulate(np.where(is_start, np.arange(n), 0))
    line_arr = np.frombuffer(lines, dtype=np.uint32)
    for j in np.nonzero(~is_start)[0]:
        original = int(line_arr[order[run_start[j]]])
        line = int(line_arr[order[j]])
        report.add(Finding("warning", "duplicate_example", line, None, f"same messages as line {original}"))
    report.findings.sort(key=lambda f: f.line or 0)


def _label_counts(path: Path, report: FileReport) -> Counter[str] | None:
    """Label distribution for a classification file: from the sidecar prepare wrote, or when every
    example's answer parses as labels and there are few distinct answers."""
    if report.answers is None or not report.answers:
        return None
    sidecar = str(path)[: -len(".jsonl")] + ".labels.json" if str(path).endswith(".jsonl") else None
    is_classification = sidecar is not None and os.path.exists(sidecar)
    if not is_classification and len(report.answers) > max(20, report.n_examples // 2):
        return None
    counts: Counter[str] = Counter()
    for answer, n in report.answers.items():
        try:
            labels = parse_labels(answer)
        except LabelError:
            return None
        for label in labels:
            counts[label] += n
    return counts
