"""The job's contract is the one source of its states, bounds and defaults: settings, flags,
request validation, the OpenAPI document and the stored form are derived from it, and no second
literal of them is left in src/."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from gpt_finetune import contract as c
from gpt_finetune.contract import JobSpec, JobStatus, LocalOptions, SupervisedHyperparameters, spec_of
from gpt_finetune.errors import BackendError, ConfigError

SRC = Path(__file__).resolve().parent.parent / "src" / "gpt_finetune"


def test_the_status_sets_follow_from_the_transitions():
    assert set(c.TERMINAL) == {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    assert set(c.UNFINISHED) | set(c.TERMINAL) == set(JobStatus)
    assert set(c.NEEDS_RUNNER) < set(c.UNFINISHED) and JobStatus.PAUSED not in c.NEEDS_RUNNER
    for state in JobStatus:  # every state but the first is reached from another one
        assert state == JobStatus.VALIDATING_FILES or c.sources(state)
    assert JobStatus.CANCELLED in c.TRANSITIONS[JobStatus.PAUSED]
    assert c.sources(JobStatus.PAUSED) == (JobStatus.QUEUED, JobStatus.RUNNING)
    assert c.sql_in([JobStatus.QUEUED, JobStatus.RUNNING]) == "status IN ('queued', 'running')"
    with pytest.raises(ValueError):
        c.sql_in(["queued'); DROP TABLE jobs; --"])  # only the enum's values reach SQL


def test_the_jobs_service_refuses_moves_the_contract_does_not_allow(tmp_path):
    from gpt_finetune.services import Services

    s = Services.open(tmp_path / "home")
    train = tmp_path / "t.jsonl"
    train.write_text(
        "".join(
            f'{{"messages": [{{"role": "user", "content": "q{i}"}}, {{"role": "assistant", "content": "a"}}]}}\n'
            for i in range(12)
        )
    )
    fid = s.files.create_from_path(train)["id"]
    job = s.jobs.create(model="SmolLM2-135M-Instruct", training_file=fid, start=False)
    assert s.jobs.status(job["id"]) == JobStatus.VALIDATING_FILES
    assert not s.jobs.succeed(job["id"])  # validating_files cannot succeed
    with pytest.raises(BackendError) as exc:
        s.jobs.resume(job["id"])  # only a paused job resumes
    assert exc.value.code == "job_not_resumable"
    s.jobs.cancel(job["id"])
    assert not s.jobs.fail(job["id"], "x", "y")  # a terminal state is final
    assert s.jobs.status(job["id"]) == JobStatus.CANCELLED


def test_settings_keys_and_parsers_come_from_the_declarations():
    from gpt_finetune.settings import KEYS, LOCAL_KEYS, load_settings

    declared = set(LocalOptions.keys())
    assert declared == set(LOCAL_KEYS) and declared <= KEYS
    assert {"lora_r", "lora_target_modules", "max_length", "micro_batch_tokens"} <= declared
    assert set(dict(SupervisedHyperparameters.declared())) <= KEYS
    # a bound is the declaration's, in a config file as on the command line
    hi = spec_of(dict(c.LoraOptions.declared())["lora_dropout"]).hi
    with pytest.raises(ConfigError, match=f"{hi:g}"):
        load_settings({}, env={"GPT_FINETUNE_LORA_DROPOUT": str(hi + 0.05)}, default_config="/nonexistent")
    epochs = spec_of(dict(SupervisedHyperparameters.declared())["n_epochs"])
    with pytest.raises(ConfigError, match=f"from 1 to {epochs.hi:g}"):
        load_settings({}, env={"GPT_FINETUNE_N_EPOCHS": str(int(epochs.hi) + 1)}, default_config="/nonexistent")
    s = load_settings({}, env={"GPT_FINETUNE_LORA_R": "16"}, default_config="/nonexistent")
    assert s.local_options().lora.r == 16 and s.local_options().lora.alpha == c.LoraOptions().alpha
    assert load_settings({}, env={}, default_config="/nonexistent").local_options() == LocalOptions()


def test_every_declared_local_option_is_a_flag_of_finetune(tmp_path):
    from gpt_finetune.cli.main import build_parser

    parser = build_parser()
    ns = parser.parse_args(
        ["finetune", "--lora-r", "32", "--lora-target-modules", "q_proj,v_proj", "--max-length", "99"]
    )
    from gpt_finetune.cli.common import settings_from

    options = settings_from(ns).local_options()
    assert options.lora.r == 32 and options.lora.target_modules == ("q_proj", "v_proj")
    assert options.model.max_length == 99
    help_text = parser._subparsers._group_actions[0].choices["finetune"].format_help()  # type: ignore[union-attr]
    for key, (_group, f) in LocalOptions.keys().items():
        if spec_of(f).flag:
            assert "--" + key.replace("_", "-") in help_text


def test_request_validation_and_the_openapi_document_share_the_bounds():
    from gpt_finetune.request_rules import chat_schema, job_request, job_schema, parse_chat

    schema = job_schema()
    for name, f in SupervisedHyperparameters.declared():
        spec = spec_of(f)
        number = schema["properties"]["hyperparameters"]["properties"][name]["anyOf"][1]
        assert number.get("maximum") == spec.hi
        if spec.hi is not None:
            with pytest.raises(BackendError) as exc:
                job_request({"model": "m", "training_file": "f", "hyperparameters": {name: int(spec.hi) + 1}})
            assert exc.value.param == f"hyperparameters.{name}" and exc.value.code == "invalid_hyperparameters"
    assert schema["properties"]["seed"]["maximum"] == c.SEED_MAX
    assert schema["properties"]["suffix"]["maxLength"] == c.SUFFIX_MAX
    assert schema["properties"]["metadata"]["maxProperties"] == c.MAX_METADATA_KEYS
    chat = chat_schema()["properties"]
    assert chat["n"]["anyOf"][0]["maximum"] == c.MAX_N and chat["top_p"]["anyOf"][0]["maximum"] == c.TOP_P_RANGE[1]
    assert chat["temperature"]["anyOf"][0]["maximum"] == c.TEMPERATURE_RANGE[1]
    with pytest.raises(BackendError) as exc:
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": c.MAX_N + 1})
    assert exc.value.param == "n" and exc.value.code == "invalid_value"
    with pytest.raises(BackendError) as exc:
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": "2"})
    assert exc.value.code == "invalid_type"


def test_a_job_description_round_trips_and_old_rows_still_load():
    spec = JobSpec(
        base="SmolLM2-135M-Instruct",
        hyperparameters=SupervisedHyperparameters(3, 8, 2.0),
        local=LocalOptions.from_settings({"lora_r": 4, "micro_batch_tokens": 700, "lora_target_modules": ["q_proj"]}),
        labels=c.LabelSets(("bug", "feature"), "seed", ("'bug'", "'feature'")),
    )
    assert JobSpec.from_json(spec.to_json()) == spec
    assert JobSpec.from_row({"spec": spec.to_json()}) == spec
    # a row written before the description was stored: options and hyperparameters as they were
    old = {
        "base_model": "SmolLM2-135M-Instruct",
        "method": {"type": "supervised"},
        "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 2.0},
        "options": {
            "base": "SmolLM2-135M-Instruct",
            "lora_r": 4,
            "micro_batch_tokens": 700,
            "lora_target_modules": ["q_proj"],
            "labels": {"labels": ["bug", "feature"], "label_format": "seed", "label_sets": ["'bug'", "'feature'"]},
        },
        "spec": None,
    }
    assert JobSpec.from_row(old) == spec
    assert spec.local.changed() == {"lora_r": 4, "lora_target_modules": ["q_proj"], "micro_batch_tokens": 700}
    assert SupervisedHyperparameters().resolved(200).batch_size == c.auto_batch_size(200)


def test_defaults_are_declared_once():
    """The trainer's and the tokenizer's defaults are the contract's."""
    from gpt_finetune.local.tokenizer import summarize  # noqa: F401  (imports DEFAULT_MAX_LENGTH)
    from gpt_finetune.local.trainer import TrainSpec

    fields = {f.name: f for f in dataclasses.fields(TrainSpec)}
    assert fields["max_length"].default == c.DEFAULT_MAX_LENGTH == c.ModelOptions().max_length
    assert fields["lora"].default_factory() == c.LoraOptions()  # type: ignore[misc]


def _literals(path: Path) -> list[tuple[int, object]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant):
            out.append((node.lineno, node.value))
    return out


# OpenAI's Batch API states and the migration's own step states share words with the job's; these
# files name them as such
OTHER_STATE_MACHINES = {"migrate/record.py": {"failed", "cancelled"}, "migrate/retrain.py": {"failed"}}


def test_no_second_literal_of_the_contract_in_src():
    statuses = {s.value for s in JobStatus}
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel == "contract.py":
            continue
        text = path.read_text()
        allowed = OTHER_STATE_MACHINES.get(rel, set())
        for line, value in _literals(path):
            if isinstance(value, str) and value in statuses - allowed:
                found.append(f"{rel}:{line}: the status {value!r}")
            if isinstance(value, str) and re.search(r"status (NOT )?IN \(|status = '", value):
                found.append(f"{rel}:{line}: a status clause written by hand")
            if value in (2**31 - 1, 2147483647):
                found.append(f"{rel}:{line}: the seed maximum")
        for m in re.finditer(r"\b1\.\.(50|256)\b|max_length[^\n]{0,40}\b2048\b|lora_\w+\"?\s*[:=]\s*\d", text):
            found.append(f"{rel}: {m.group(0)!r}")
    assert found == []


def test_the_contract_is_import_light():
    """Data commands import it: it must not pull in torch, pydantic or the services."""
    import subprocess
    import sys

    code = (
        "import sys, gpt_finetune.contract, gpt_finetune.request_rules, gpt_finetune.settings; "
        "print(sorted(m for m in ('torch', 'pydantic', 'fastapi', 'gpt_finetune.services') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
