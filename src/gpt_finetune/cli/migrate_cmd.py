"""``migrate``: move an organisation's OpenAI fine-tunes to this machine (README "Moving off OpenAI")."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from ..contract import TERMINAL, UNSUCCESSFUL, JobStatus
from ..errors import BackendError, GptFinetuneError
from .common import add_config_flag, add_connection_flags, info, settings_from, typed, warn

STEPS = ("inventory", "record", "retrain", "compare", "status", "all")


def add_migrate(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="migrate_cmd", required=True, metavar="{" + ",".join(STEPS) + "}")
    parsers = {
        "inventory": sub.add_parser("inventory", help="list every job and fine-tuned model, their files and dates"),
        "record": sub.add_parser("record", help="record the old models' answers while they still serve"),
        "retrain": sub.add_parser("retrain", help="one local job per succeeded OpenAI job; the old id as an alias"),
        "compare": sub.add_parser("compare", help="the local models against the recorded answers, with a report"),
        "status": sub.add_parser("status", help="each model's step, and what is missing"),
        "all": sub.add_parser("all", help="every step that can be done, in order"),
    }
    for name, q in parsers.items():
        if name == "inventory":
            q.add_argument(
                "-o", "--output", dest="migration_dir", required=True, metavar="DIR", help="migration directory"
            )
        else:
            q.add_argument("migration_dir", metavar="DIR", help="the migration directory (migrate inventory -o DIR)")
        if name in ("inventory", "all"):
            q.add_argument(
                "--data",
                nargs="+",
                action="extend",
                default=[],
                metavar="PATH",
                help="your copies of the training and validation files (files or directories), matched by name and size",
            )
        if name in ("record", "retrain", "compare", "all"):
            q.add_argument(
                "--only", action="append", default=[], metavar="MODEL", help="only this model (its id, job id or key)"
            )
        if name in ("record", "all"):
            q.add_argument(
                "--prompts",
                metavar="FILE",
                help="chat JSONL whose prompts to record (default: the validation file, else the training file)",
            )
            q.add_argument("--limit", type=typed("limit"), metavar="N", help="record at most N prompts per model")
            q.add_argument(
                "--concurrency",
                type=typed("limit", "--concurrency"),
                default=4,
                help="live requests at once (default 4)",
            )
            q.add_argument(
                "--batch-api", action="store_true", help="through OpenAI's Batch API (half the price, up to 24 h)"
            )
            q.add_argument(
                "--no-wait", dest="batch_wait", action="store_false", help="--batch-api: create the batches and return"
            )
            q.add_argument(
                "--poll",
                type=typed("max_tokens", "--poll"),
                default=30,
                metavar="S",
                help="--batch-api: seconds between polls (default 30)",
            )
        if name in ("record", "compare", "all"):
            q.add_argument(
                "--max-tokens",
                dest="migrate_max_tokens",
                type=typed("max_tokens"),
                metavar="N",
                help="longest answer (record: the model's default; compare: 256)",
            )
        if name in ("retrain", "all"):
            q.add_argument("-m", "--model", dest="model", help="local base model (default local_base_model)")
            q.add_argument(
                "--from-recordings",
                action="store_true",
                help="train on the recorded answers where the job's own training file was not recovered",
            )
            q.add_argument("--retry-failed", action="store_true", help="train again where the local job failed")
        if name == "retrain":
            q.add_argument("--wait", action="store_true", help="follow the jobs until they end, then add the aliases")
        if name in ("compare", "all"):
            q.add_argument("--report", metavar="DIR", help="write the report there (default DIR/compare/<key>/)")
        if name in ("inventory", "status"):
            q.add_argument("--json", action="store_true", help="print JSON")
        q.add_argument(
            "--today",
            type=typed("today"),
            metavar="YYYY-MM-DD",
            help="the day taken as today (YYYY-MM-DD), for the days left",
        )
        q.add_argument(
            "--shutdown-table",
            dest="shutdown_table",
            metavar="FILE",
            help="JSON file of shutdown dates over the built-in table",
        )
        add_config_flag(q)
        add_connection_flags(q, choose_backend=False)  # OpenAI is one side, this machine the other
    p.set_defaults(func=cmd_migrate)


class Context:
    """What the steps share: settings, dates, the directory, and the two sides of the move."""

    def __init__(self, ns: argparse.Namespace) -> None:
        from ..openai_facts import load_shutdown_table

        self.ns = ns
        self.settings = settings_from(ns)
        self.root = Path(ns.migration_dir)
        self.today = dt.date.fromisoformat(self.settings.today) if self.settings.today else dt.date.today()
        self.training_ends, self.table = load_shutdown_table(self.settings.shutdown_table)
        self._source: Any = None
        self._local: Any = None
        self._services: Any = None

    @property
    def source(self) -> Any:
        """OpenAI (or the base URL): where the fine-tunes are now."""
        if self._source is None:
            from ..backends.openai_backend import OpenAIBackend

            self._source = OpenAIBackend(self.settings.openai_api_key, self.settings.base_url)
            info(f"OpenAI side: {self._source.describe()}")
        return self._source

    @property
    def services(self) -> Any:
        """This machine's services (with the runner's launcher): the migration writes jobs and
        aliases through them."""
        if self._services is None:
            from ..backends.local import open_services

            self._services = open_services(self.settings)
        return self._services

    @property
    def local(self) -> Any:
        """This machine's backend, over the same services, for following jobs."""
        if self._local is None:
            from ..backends.local import LocalBackend

            self._local = LocalBackend(self.services, self.settings.local_options())
        return self._local

    def manifest(self) -> Any:
        from ..migrate import manifest as mf

        return mf.load(self.root)

    def selected(self, manifest: Any) -> list[Any]:
        only = getattr(self.ns, "only", None) or []
        if not only:
            return list(manifest.models)
        out = []
        for name in only:
            model = manifest.find(name)
            if model is None:
                raise BackendError(
                    f"{name} is not a model of this migration", hint=f"see: gpt-finetune migrate status {self.root}"
                )
            out.append(model)
        return out


def cmd_migrate(ns: argparse.Namespace) -> int:
    ctx = Context(ns)
    return int(globals()[f"_{ns.migrate_cmd}"](ctx) or 0)


# ---- the steps ----------------------------------------------------------------------------------
def _inventory(ctx: Context) -> int:
    from ..migrate import inventory

    inv = inventory.take(
        ctx.source,
        ctx.root,
        data=ctx.ns.data,
        today=ctx.today,
        table=ctx.table,
        training_ends=ctx.training_ends,
        say=info,
    )
    m = inv.manifest
    if getattr(ctx.ns, "json", False):
        print(json.dumps(m.model_dump(mode="json"), indent=1))
    else:
        _print_inventory(ctx, m)
    for note in inv.notes:
        warn(note)
    info(f"Wrote {ctx.root / 'manifest.json'}")
    return 0


def _print_inventory(ctx: Context, m: Any) -> None:
    from ..migrate.status import days_left

    left = (ctx.training_ends - ctx.today).days
    info(
        f"Organisation {m.organization or '?'}: {len(m.jobs)} fine-tuning jobs, {len(m.models)} fine-tuned models. "
        f"New OpenAI jobs end {ctx.training_ends} ({left} days from {ctx.today})."
    )
    rows = [
        [
            "model",
            "job",
            "status",
            "method",
            "epochs",
            "batch",
            "lr x",
            "stops serving",
            "days left",
            "training file",
            "validation file",
        ]
    ]
    for job in m.jobs:
        model = next((x for x in m.models if x.job == job.id), None)
        hp = job.hyperparameters
        rows.append(
            [
                job.fine_tuned_model or "-",
                job.id,
                job.status,
                job.method,
                str(hp.get("n_epochs", "-")),
                str(hp.get("batch_size", "-")),
                str(hp.get("learning_rate_multiplier", "-")),
                str(model.stops_serving) if model and model.stops_serving else "-",
                str(days_left(model.stops_serving, ctx.today)) if model and model.stops_serving else "-",
                _file_state(job.training_file),
                _file_state(job.validation_file),
            ]
        )
    for model in m.models:
        if model.job is None:
            stops = model.stops_serving
            rows.append(
                [
                    model.id,
                    "-",
                    "(no job)",
                    "-",
                    "-",
                    "-",
                    "-",
                    str(stops or "-"),
                    str(days_left(stops, ctx.today) if stops else "-"),
                    "-",
                    "-",
                ]
            )
    _table(rows)


def _file_state(ref: Any) -> str:
    if ref is None:
        return "-"
    if ref.local:
        return f"{ref.filename} ({ref.source})"
    if ref.filename is None:
        return f"{ref.id} (not examined)" if not ref.refused else f"{ref.id} (gone)"
    return f"{ref.filename}: MISSING"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _record(ctx: Context) -> int:
    from tqdm import tqdm

    from ..migrate import record as rec
    from ..migrate.status import days_left

    m = ctx.manifest()
    rec.check_organization(ctx.source, m)
    problems = 0
    for model in ctx.selected(m):
        left = days_left(model.stops_serving, ctx.today)
        if left is not None and left < 0:
            warn(
                f"{model.id} stopped serving on {model.stops_serving}: it cannot be recorded, only retrained from its data"
            )
            continue
        prompts, where = rec.prompt_set(ctx.root, m, model, prompts_file=ctx.ns.prompts, limit=ctx.settings.limit)
        if prompts is None:
            warn(f"{model.id}: {where}")
            problems += 1
            continue
        if (ctx.ns.prompts or ctx.settings.limit) and where.startswith("the prompt set fixed"):
            warn(f"{model.key}: --prompts and --limit are ignored: {where} (remove it to choose another set)")
        info(f"{model.id}: {len(prompts)} prompts from {where}")
        if ctx.ns.batch_api:
            result = rec.record_batch(
                ctx.source,
                ctx.root,
                m,
                model,
                prompts,
                max_tokens=ctx.ns.migrate_max_tokens,
                wait_done=ctx.ns.batch_wait,
                poll=ctx.ns.poll,
                say=info,
            )
        else:
            done = len(rec.recordings(ctx.root, model.key))
            with tqdm(total=len(prompts), initial=min(done, len(prompts)), desc=model.key[:30], file=sys.stderr) as bar:
                result = rec.record_live(
                    ctx.source,
                    ctx.root,
                    model,
                    prompts,
                    concurrency=ctx.ns.concurrency,
                    max_tokens=ctx.ns.migrate_max_tokens,
                    progress=bar.update,
                )
        line = f"{model.id}: recorded {result.done}/{result.total} ({result.answered} now, {result.before} before)"
        if result.gone:
            line += f"; it no longer serves: {result.gone}"
        if result.pending:
            line += f"; {result.pending}"
        info(line)
        for failure in result.failed[:5]:
            warn(f"{model.key}: {failure}")
        if result.failed or result.gone or result.done < result.total:
            problems += 1
    return 1 if problems else 0


def _retrain(ctx: Context, *, wait: bool | None = None) -> int:
    from ..migrate import retrain as rt
    from .watch import watch_job

    m = ctx.manifest()
    local = ctx.local
    base = ctx.settings.model or ctx.settings.local_base_model or ctx.services.models.local_base_model
    problems = 0
    to_follow = []
    for model in ctx.selected(m):
        outcome = rt.retrain_one(
            ctx.services,
            ctx.root,
            m,
            model,
            base_model=base,
            options=ctx.settings.local_options(),
            from_recordings=ctx.ns.from_recordings,
            retry_failed=ctx.ns.retry_failed,
        )
        (info if outcome.state in ("created", "exists") else warn)(f"{model.id}: {outcome.message}")
        if outcome.local_job and outcome.state in ("created", "exists"):
            to_follow.append((model, outcome.local_job))
        elif outcome.state != "exists":
            problems += 1
    wait = ctx.ns.wait if wait is None else wait
    for model, job_id in to_follow:
        job = local.retrieve_job(job_id)
        if wait and job.status not in TERMINAL:
            job = watch_job(local, job_id)
        if job.status == JobStatus.SUCCEEDED:
            target = rt.link(ctx.services, m, model)
            info(f"{model.id} now answers as {target} (gpt-finetune serve, infer, eval, batch files)")
        elif job.status in UNSUCCESSFUL:
            problems += 1
        elif not wait:
            info(f"{model.id}: local job {job_id} is {job.status}; follow it with: gpt-finetune jobs wait {job_id}")
    return 1 if problems else 0


def _compare(ctx: Context) -> int:
    from tqdm import tqdm

    from ..migrate import compare as cmp
    from ..migrate.record import recordings

    m = ctx.manifest()
    services = ctx.services
    problems = 0
    chosen = ctx.selected(m)
    for model in chosen:
        n = len(recordings(ctx.root, model.key))
        if not n:
            warn(f"{model.id}: nothing recorded to compare with")
            problems += 1
            continue
        report = ctx.ns.report
        if report and len(chosen) > 1:
            report = str(Path(report) / model.key)
        try:
            with tqdm(total=n, desc=f"compare {model.key}"[:30], file=sys.stderr) as bar:
                result = cmp.compare(
                    services,
                    ctx.root,
                    model,
                    max_tokens=ctx.ns.migrate_max_tokens or 256,
                    report_dir=report,
                    progress=bar.update,
                )
        except GptFinetuneError as exc:
            warn(f"{model.id}: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
            problems += 1
            continue
        print("\n".join(cmp.summary(result)))
        info(f"Wrote {Path(report) if report else ctx.root / 'compare' / model.key}/report.md")
    return 1 if problems else 0


def _status(ctx: Context) -> int:
    from ..migrate import status as st

    m = ctx.manifest()
    services = ctx.services
    found = st.steps(services, ctx.root, m, ctx.today)
    if getattr(ctx.ns, "json", False):
        print(
            json.dumps(
                [
                    {
                        "model": s.model.id,
                        "key": s.model.key,
                        "days_left": s.days_left,
                        "phase": s.phase,
                        "prompts": s.prompts,
                        "recorded": s.recorded,
                        "batch": s.batch,
                        "local_job": s.local_job["id"] if s.local_job else None,
                        "local_status": s.local_job["status"] if s.local_job else None,
                        "alias_of": s.alias,
                        "compared": s.compared,
                        "missing": s.missing,
                    }
                    for s in found
                ],
                indent=1,
            )
        )
        return 0
    rows = [["model", "days left", "step", "recorded", "local job", "missing"]]
    for s in found:
        rows.append(
            [
                s.model.id,
                "-" if s.days_left is None else str(s.days_left),
                s.phase,
                f"{s.recorded}/{s.prompts}" if s.prompts is not None else "-",
                f"{s.local_job['id']} ({s.local_job['status']})" if s.local_job else "-",
                ", ".join(s.missing) or "nothing",
            ]
        )
    _table(rows)
    skipped = [j for j in m.jobs if j.status != JobStatus.SUCCEEDED]
    if skipped:
        info(f"Not moved: {', '.join(f'{j.id} ({j.status})' for j in skipped)}")
    return 0


def _all(ctx: Context) -> int:
    from ..migrate import manifest as mf

    if ctx.ns.data or not mf.manifest_path(ctx.root).is_file():
        _inventory(ctx)
    failed = []
    for name, step in (("record", _record), ("retrain", lambda c: _retrain(c, wait=True)), ("compare", _compare)):
        info(f"== {name}")
        try:
            if step(ctx):
                failed.append(name)
        except GptFinetuneError as exc:
            warn(f"{name}: {exc.message}")
            failed.append(name)
    info("== status")
    _status(ctx)
    if failed:
        info(f"Could not finish: {', '.join(failed)} (see the warnings above; rerun to continue)")
    return 1 if failed else 0
