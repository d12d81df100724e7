"""Aliases: other names a model answers to (the OpenAI id of a fine-tune moved here)."""

from __future__ import annotations

import pytest

from gpt_finetune.cli.main import main
from gpt_finetune.errors import BackendError, NotFoundError
from gpt_finetune.services import Services

OLD = "ft:gpt-4o-mini-2024-07-18:acme::AbC123"  # four ':' parts after ft, like our checkpoint ids


@pytest.fixture
def services(tmp_path):
    s = Services.open(tmp_path / "home")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    s.models.register(
        "ft:SmolLM2-135M-Instruct:labeller:ftjob-1",
        kind="fine-tuned",
        base="SmolLM2-135M-Instruct",
        path=adapter,
        job_id="ftjob-1",
    )
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    s.models.register(
        "ft:SmolLM2-135M-Instruct:labeller:ftjob-1:ckpt-step-4",
        kind="checkpoint",
        base="SmolLM2-135M-Instruct",
        path=ckpt,
        job_id="ftjob-1",
    )
    return s


MODEL = "ft:SmolLM2-135M-Instruct:labeller:ftjob-1"


def test_an_alias_resolves_before_any_parsing_and_is_listed_with_its_parent(services, tmp_path):
    services.models.add_alias(OLD, MODEL)
    assert services.models.locate(OLD) == ("SmolLM2-135M-Instruct", str(tmp_path / "adapter"))
    listed = {m["id"]: m for m in services.models.list()}
    assert listed[OLD]["parent"] == MODEL and listed[OLD]["root"] == "SmolLM2-135M-Instruct"
    assert services.models.retrieve(OLD)["parent"] == MODEL
    # adding it again is a no-op; another target needs replace
    services.models.add_alias(OLD, MODEL)
    with pytest.raises(BackendError) as err:
        services.models.add_alias(OLD, MODEL + ":ckpt-step-4")
    assert err.value.code == "alias_exists"
    services.models.add_alias(OLD, MODEL + ":ckpt-step-4", replace=True)
    assert services.models.resolve(OLD) == MODEL + ":ckpt-step-4"


def test_an_alias_of_an_alias_names_the_model(services):
    services.models.add_alias(OLD, MODEL)
    services.models.add_alias("labeller", OLD)
    assert services.models.resolve("labeller") == MODEL


def test_an_alias_never_shadows_a_real_model(services):
    for name in (MODEL, MODEL + ":ckpt-step-4", "SmolLM2-135M-Instruct", "gpt-4o-mini"):
        with pytest.raises(BackendError) as err:
            services.models.add_alias(name, MODEL)
        assert err.value.code == "alias_shadows_model"
    for bad in ("", " x", "a b", "x\n", "é", "a" * 257):
        with pytest.raises(BackendError) as err:
            services.models.add_alias(bad, MODEL)
        assert err.value.code == "invalid_alias"
    with pytest.raises(NotFoundError):
        services.models.add_alias(OLD, "ft:SmolLM2-135M-Instruct::ftjob-nope")


def test_deleting_an_alias_keeps_the_model_and_deleting_the_model_drops_its_aliases(services):
    services.models.add_alias(OLD, MODEL)
    services.models.add_alias("step4", MODEL + ":ckpt-step-4")
    assert services.models.delete(OLD) is True
    assert services.models.retrieve(MODEL)["id"] == MODEL
    with pytest.raises(NotFoundError):
        services.models.locate(OLD)
    services.models.add_alias(OLD, MODEL)
    services.models.delete(MODEL)
    assert services.models.aliases() == []
    with pytest.raises(NotFoundError):
        services.models.retrieve(OLD)


def test_models_alias_and_unalias_through_the_cli(services, isolated_home, capsys, monkeypatch):
    monkeypatch.setenv("GPT_FINETUNE_HOME", str(services.home.root))
    assert main(["models", "alias", OLD, MODEL, "--backend", "local"]) == 0
    assert main(["models", "list", "--backend", "local"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:3] == [OLD, "user", MODEL] for line in out.splitlines())
    assert main(["models", "alias", MODEL, MODEL, "--backend", "local"]) == 1
    assert "never shadows" in capsys.readouterr().err
    assert main(["models", "unalias", OLD, "--backend", "local"]) == 0
    assert main(["models", "unalias", OLD, "--backend", "local"]) == 1
    assert "is not an alias" in capsys.readouterr().err


def test_a_failed_job_leaves_no_base_model_listed(services):
    from gpt_finetune.store import now

    for job_id, status, base in (("ftjob-a", "failed", "Org--gone-model"), ("ftjob-b", "succeeded", "tiny-llama")):
        services.store.insert(
            "jobs",
            {
                "id": job_id, "created_at": now(), "model": base, "base_model": base, "status": status,
                "training_file": "file-x", "hyperparameters": {}, "method": {}, "seed": 1, "options": {"base": "/x/" + base},
            },
        )  # fmt: skip
    assert "Org--gone-model" not in services.models.base_ids() and "tiny-llama" in services.models.base_ids()
    with pytest.raises(NotFoundError):
        services.models.retrieve("Org--gone-model")
