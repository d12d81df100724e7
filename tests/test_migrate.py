"""``gpt-finetune migrate`` against a fake OpenAI organisation on the SDK's mock transport:
inventory over several pages, refused file content and the user's copies, recording with a model
that stops serving and a 429, the Batch API (and a batch created just before a crash), and the
one-line errors for bad manifests, data that matches nothing and another organisation's directory."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl
from fake_org import KEY, FakeOrg

from gpt_finetune.backends import openai_backend
from gpt_finetune.cli.main import main
from gpt_finetune.migrate import manifest as mf
from gpt_finetune.migrate import record as rec

TODAY = "2026-12-01"
LABELS = ["ovs", "proxy", "windows"]


def issue(i: int, with_answer: bool = True) -> dict:
    label = LABELS[i % 3]
    messages = [
        {"role": "system", "content": "Label the issue."},
        {"role": "user", "content": f"title: issue {i} body: something about {label}"},
    ]
    if with_answer:
        messages.append({"role": "assistant", "content": f"'{label}'"})
    return {"messages": messages}


def label_of(model: str, messages: list[dict]) -> str:
    """The old model's answer: the label the prompt names."""
    return "'" + messages[-1]["content"].rsplit(" ", 1)[-1] + "'"


@pytest.fixture
def org(monkeypatch):
    fake = FakeOrg()
    fake.answer = label_of
    monkeypatch.setattr(openai_backend, "http_client_factory", fake.client)
    return fake


@pytest.fixture
def copies(tmp_path):
    d = tmp_path / "my-data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [issue(i) for i in range(30)])
    write_jsonl(d / "valid.jsonl", [issue(i) for i in range(100, 112)])
    return d


def build(org: FakeOrg, copies) -> dict:
    """Five jobs over three pages: a labeller whose files OpenAI refuses (the user has copies), one
    whose base already retired, a failed one, one whose files OpenAI serves, and a DPO job."""
    train = org.add_file((copies / "train.jsonl").read_bytes(), "train.jsonl", refuse=True)
    valid = org.add_file((copies / "valid.jsonl").read_bytes(), "valid.jsonl", refuse=True)
    served = org.add_file((copies / "train.jsonl").read_bytes(), "served.jsonl")
    lost_valid = org.add_file(b'{"messages": []}\n', "lost-valid.jsonl", refuse=True)
    jobs = {
        "labeller": org.add_job(
            base="gpt-4o-mini-2024-07-18", training_file=train, validation_file=valid, suffix="labeller"
        ),
        "retired": org.add_job(base="gpt-3.5-turbo-0125", training_file=train, serving=False),
        "failed": org.add_job(base="gpt-4o-mini-2024-07-18", training_file=train, status="failed"),
        "served": org.add_job(
            base="gpt-4.1-mini-2025-04-14", training_file=served, validation_file=lost_valid, n_epochs=2
        ),
        "dpo": org.add_job(base="gpt-4o-2024-08-06", training_file=train, method="dpo"),
    }
    return jobs


def inventory(directory, *extra: str) -> int:
    return main(["migrate", "inventory", "-o", str(directory), "-k", KEY, "--today", TODAY, *extra])


def test_inventory_lists_every_page_downloads_what_is_served_and_matches_the_users_copies(
    org, copies, tmp_path, capsys
):
    jobs = build(org, copies)
    d = tmp_path / "move"
    assert inventory(d, "--data", str(copies)) == 0
    out, err = capsys.readouterr()
    m = mf.load(d)
    assert [j.id for j in m.jobs] == [j["id"] for j in reversed(list(jobs.values()))]  # all three pages, newest first
    assert sum(1 for method, path, _ in org.log if path == "/v1/fine_tuning/jobs") == 3
    assert m.organization == "org-acme" and m.today.isoformat() == TODAY
    labeller = m.job(jobs["labeller"]["id"])
    assert labeller.suffix == "labeller" and labeller.method == "supervised"
    assert labeller.hyperparameters == {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8}
    assert labeller.training_file.refused and labeller.training_file.source == "matched"
    assert (d / labeller.training_file.local).read_bytes() == (copies / "train.jsonl").read_bytes()
    assert labeller.validation_file.source == "matched"
    assert [c.step_number for c in labeller.checkpoints] == [10]
    assert (d / labeller.result_files[0].local).read_text().startswith("step,train_loss")
    served = m.job(jobs["served"]["id"])
    assert served.training_file.source == "downloaded" and served.validation_file.local is None
    failed = m.job(jobs["failed"]["id"])
    assert failed.status == "failed" and failed.error == "bad file"
    assert failed.training_file.filename is None and failed.result_files == []  # listed, not examined
    models = {x.job: x for x in m.models}
    assert set(models) == {jobs[k]["id"] for k in ("labeller", "retired", "served", "dpo")}
    assert models[jobs["labeller"]["id"]].stops_serving.isoformat() == "2027-01-14"
    assert models[jobs["retired"]["id"]].serving is False
    assert models[jobs["retired"]["id"]].stops_serving.isoformat() == "2026-10-23"
    # the table: days left as of --today, and the missing file named with what to do
    row = next(line for line in out.splitlines() if line.startswith(jobs["labeller"]["fine_tuned_model"]))
    assert " 44 " in row and "train.jsonl (matched)" in row
    assert "lost-valid.jsonl" in err and "give your copy with --data" in err
    assert "2027-01-06 (36 days" in err
    # taken again: the same migration, nothing downloaded twice
    contents = sum(1 for _, path, _ in org.log if path.endswith("/content"))
    assert inventory(d) == 0
    again = mf.load(d)
    assert again.migration_id == m.migration_id
    assert again.job(jobs["labeller"]["id"]).training_file.source == "matched"
    assert (
        sum(1 for _, path, _ in org.log if path.endswith("/content")) - contents == 1
    )  # only the one still missing is asked again


def test_the_shutdown_table_and_today_can_be_overridden(org, copies, tmp_path, capsys):
    build(org, copies)
    table = tmp_path / "dates.json"
    table.write_text(json.dumps({"training_ends": "2027-02-01", "retirements": {"gpt-4o-mini": "2027-03-01"}}))
    d = tmp_path / "move"
    assert inventory(d, "--shutdown-table", str(table)) == 0
    m = mf.load(d)
    assert m.training_ends.isoformat() == "2027-02-01"
    assert next(x for x in m.models if x.base_model.startswith("gpt-4o-mini")).stops_serving.isoformat() == "2027-03-01"
    table.write_text('{"retirements": {"gpt-4o": "soon"}}')
    assert inventory(d, "--shutdown-table", str(table)) == 1
    assert "retirements.gpt-4o: expected a date" in capsys.readouterr().err


def test_bad_input_gets_one_line_errors(org, copies, tmp_path, capsys):
    build(org, copies)
    d = tmp_path / "move"
    other = tmp_path / "other.jsonl"
    other.write_text("{}\n")
    assert inventory(d, "--data", str(other)) == 1
    err = capsys.readouterr().err
    assert f"\nError: {other}: matches none of the organisation's 4" in err and "train.jsonl (5600 bytes)" in err
    assert inventory(d, "--data", str(tmp_path / "nope")) == 1
    assert "does not exist" in capsys.readouterr().err
    assert inventory(d) == 0
    capsys.readouterr()
    # a manifest edited by hand into nonsense
    raw = json.loads((d / "manifest.json").read_text())
    raw["models"][0]["key"] = "../../etc"
    (d / "manifest.json").write_text(json.dumps(raw))
    assert main(["migrate", "status", str(d)]) == 1
    err = capsys.readouterr().err
    assert "manifest.json: models[0].key:" in err and err.count("Error:") == 1
    (d / "manifest.json").write_text("{not json")
    assert main(["migrate", "status", str(d)]) == 1
    assert "manifest.json:1: not JSON" in capsys.readouterr().err
    assert main(["migrate", "status", str(tmp_path)]) == 1
    assert "not a migration directory" in capsys.readouterr().err


def test_a_directory_of_another_organisation_is_refused(org, copies, tmp_path, capsys, monkeypatch):
    build(org, copies)
    d = tmp_path / "move"
    assert inventory(d) == 0
    other = FakeOrg(organization="org-other")
    other.add_job(base="gpt-4o-mini-2024-07-18", training_file=other.add_file(b"x", "t.jsonl"))
    monkeypatch.setattr(openai_backend, "http_client_factory", other.client)
    capsys.readouterr()
    assert inventory(d) == 1
    assert (
        "holds the migration of organisation org-acme, but this API key belongs to org-other" in capsys.readouterr().err
    )
    assert main(["migrate", "record", str(d), "-k", KEY, "--today", TODAY]) == 1
    assert "organisation org-acme's, but this API key belongs to org-other" in capsys.readouterr().err
    assert mf.load(d).organization == "org-acme"


def test_record_stops_at_a_model_that_stops_serving_and_waits_out_a_429(org, copies, tmp_path, capsys):
    jobs = build(org, copies)
    d = tmp_path / "move"
    assert inventory(d, "--data", str(copies)) == 0
    labeller = jobs["labeller"]["fine_tuned_model"]
    org.gone_after[labeller] = 5
    org.rate_limited[labeller] = 1
    key = jobs["labeller"]["id"]
    assert main(["migrate", "record", str(d), "-k", KEY, "--today", TODAY, "--only", key, "--concurrency", "1"]) == 1
    err = capsys.readouterr().err
    assert "recorded 5/12" in err and "no longer serves" in err
    answers = rec.recordings(d, key)
    assert len(answers) == 5
    prompts = [json.loads(x) for x in (d / "prompts" / f"{key}.jsonl").read_text().splitlines()]
    assert len(prompts) == 12 and prompts[0]["reference"] == "'proxy'"  # its validation file, references kept
    for p in prompts[:5]:
        assert answers[p["custom_id"]]["answer"] == label_of("", p["messages"])
    # 5 answers, the 429 asked again after its Retry-After, and one 404 ends it
    assert len(org.chats(labeller)) == 5 + 1 + 1
    before = len(org.chats(labeller))
    assert main(["migrate", "record", str(d), "-k", KEY, "--today", TODAY, "--only", key, "--concurrency", "1"]) == 1
    assert len(org.chats(labeller)) == before + 1  # a rerun asks once, not forever
    assert len(rec.recordings(d, key)) == 5


def test_record_skips_a_model_past_its_date_and_says_what_is_missing(org, copies, tmp_path, capsys):
    jobs = build(org, copies)
    d = tmp_path / "move"
    assert inventory(d, "--data", str(copies)) == 0
    assert main(["migrate", "record", str(d), "-k", KEY, "--today", TODAY, "--limit", "4"]) == 0
    err = capsys.readouterr().err
    retired = jobs["retired"]["fine_tuned_model"]
    assert f"{retired} stopped serving on 2026-10-23: it cannot be recorded" in err
    assert retired not in {b["model"] for _, p, b in org.log if p == "/v1/chat/completions"}
    assert len(rec.recordings(d, jobs["labeller"]["id"])) == 4
    assert len(rec.recordings(d, jobs["served"]["id"])) == 4  # from its downloaded training file
    assert main(["migrate", "status", str(d), "--today", TODAY]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(retired))
    assert "cannot be recorded: it stopped serving" in line and "retrain" in line


def test_batch_api_round_trip_and_a_batch_created_before_a_crash_is_found_again(org, copies, tmp_path, monkeypatch):
    jobs = build(org, copies)
    d = tmp_path / "move"
    assert inventory(d, "--data", str(copies)) == 0
    key = jobs["labeller"]["id"]
    real = openai_backend.OpenAIBackend.create_batch

    def create_then_die(self, *args, **kw):
        real(self, *args, **kw)
        raise KeyboardInterrupt  # killed before the batch id is written down

    monkeypatch.setattr(openai_backend.OpenAIBackend, "create_batch", create_then_die)
    argv = ["migrate", "record", str(d), "-k", KEY, "--today", TODAY, "--only", key, "--batch-api", "--poll", "1"]
    assert main(argv) == 130
    assert len(org.batches) == 1 and rec.recordings(d, key) == {}
    monkeypatch.setattr(openai_backend.OpenAIBackend, "create_batch", real)
    org.batch_polls = 1
    assert main(argv) == 0
    assert len(org.batches) == 1  # found again by its metadata, not created twice
    uploads = [b for b in org.files.values() if b["meta"]["purpose"] == "batch"]
    assert len(uploads) == 1
    answers = rec.recordings(d, key)
    assert len(answers) == 12 and {a["via"] for a in answers.values()} == {"batch"}
    batch = next(iter(org.batches.values()))
    assert batch["metadata"]["gpt_finetune_migration"] == mf.load(d).migration_id
    assert main(argv) == 0  # everything recorded: nothing more is sent
    assert len(org.batches) == 1


@pytest.fixture
def no_runner(monkeypatch):
    """Jobs are created and checked here, not trained (the e2e test trains one for real)."""
    from gpt_finetune.services.jobs import JobService

    monkeypatch.setattr(JobService, "kick", lambda self: False)


def test_retrain_makes_one_job_per_succeeded_job_once_and_distils_where_the_data_is_lost(
    org, copies, tmp_path, capsys, no_runner, tiny_model_dir, isolated_home
):
    jobs = build(org, copies)
    lost = org.add_job(
        base="gpt-4o-mini-2024-07-18", training_file=org.add_file(b"{}\n" * 20, "gone.jsonl", refuse=True)
    )
    d = tmp_path / "move"
    assert inventory(d, "--data", str(copies)) == 0
    assert (
        main(
            [
                "migrate",
                "record",
                str(d),
                "-k",
                KEY,
                "--today",
                TODAY,
                "--only",
                lost["id"],
                "--prompts",
                str(copies / "train.jsonl"),
            ]
        )
        == 0
    )
    retrain = ["migrate", "retrain", str(d), "--today", TODAY, "--model", str(tiny_model_dir)]
    capsys.readouterr()
    assert main(retrain) == 1  # the DPO job's file holds chat examples, the lost one has no data
    err = capsys.readouterr().err
    assert "the training file of DPO job " + jobs["dpo"]["id"] + " holds chat examples, not preference pairs" in err
    assert "the training file file-" in err and "gone.jsonl" in err and "--from-recordings" in err
    from gpt_finetune.services import Services

    services = Services.open(isolated_home)
    made = {j["metadata"]["migrated_from"]: j for j in services.jobs.list_jobs(limit=50)[0]}
    assert set(made) == {jobs[k]["id"] for k in ("labeller", "retired", "served")}
    labeller = made[jobs["labeller"]["id"]]
    assert labeller["model"] == str(tiny_model_dir) and labeller["seed"] == 42
    assert services.jobs.row(labeller["id"])["suffix"] == "labeller"
    assert labeller["hyperparameters"] == {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8}
    assert labeller["metadata"]["training_data"] == "original" and labeller["validation_file"]
    assert services.files.path(labeller["training_file"]).read_bytes() == (copies / "train.jsonl").read_bytes()
    # again, with the recordings for the lost one: nothing is made twice
    assert main([*retrain, "--from-recordings"]) == 1  # the DPO job's file still holds no pairs
    again = {j["metadata"]["migrated_from"]: j for j in services.jobs.list_jobs(limit=50)[0]}
    assert set(again) == set(made) | {lost["id"]}
    distilled = again[lost["id"]]
    assert (
        distilled["metadata"]["training_data"] == "recordings" and services.jobs.row(distilled["id"])["suffix"] is None
    )
    events = [e["message"] for e in services.jobs.list_events(distilled["id"], limit=20)[0]]
    assert any("30 answers recorded from " + lost["fine_tuned_model"] in m and "distillation" in m for m in events)
    lines = services.files.path(distilled["training_file"]).read_text().splitlines()
    first = json.loads(lines[0])["messages"]
    assert len(lines) == 30 and first[-1] == {"role": "assistant", "content": label_of("", first[:-1])}


def test_all_does_what_it_can_and_says_what_it_could_not(org, copies, tmp_path, capsys, no_runner):
    jobs = build(org, copies)
    d = tmp_path / "move"
    argv = ["migrate", "all", str(d), "-k", KEY, "--today", TODAY, "--data", str(copies), "--only", jobs["dpo"]["id"]]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert (d / "manifest.json").is_file() and len(rec.recordings(d, jobs["dpo"]["id"])) == 30
    assert "holds chat examples, not preference pairs" in err and "Could not finish: retrain, compare" in err
    assert "recorded 30/30" in out or "recorded 30/30" in err


def test_a_dpo_job_retrains_as_dpo_with_its_beta(
    org, copies, tmp_path, capsys, no_runner, tiny_model_dir, isolated_home
):
    from conftest import EXAMPLES

    from gpt_finetune.data.prepare import prepare
    from gpt_finetune.services import Services

    prefs = tmp_path / "prefs.jsonl"
    prepare(EXAMPLES / "preferences.jsonl", prefs)
    job = org.add_job(
        base="gpt-4o-2024-08-06", training_file=org.add_file(prefs.read_bytes(), "prefs.jsonl"), method="dpo"
    )
    d = tmp_path / "move"
    assert inventory(d) == 0
    argv = ["migrate", "retrain", str(d), "--today", TODAY, "--model", str(tiny_model_dir)]
    assert main(argv) == 0, capsys.readouterr().err
    made = Services.open(isolated_home).jobs.list_jobs(limit=5)[0]
    assert len(made) == 1 and made[0]["metadata"]["migrated_from"] == job["id"]
    assert made[0]["method"]["type"] == "dpo"
    assert made[0]["method"]["dpo"]["hyperparameters"]["beta"] == 0.1  # the OpenAI job's
