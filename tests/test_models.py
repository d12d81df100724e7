"""/v1/models' shapes: every fine-tuned model and checkpoint names its base (parent, root)."""

from __future__ import annotations

import json

from gpt_finetune.services import Services


def test_models_name_their_base_and_configured_local_bases_are_listed(tmp_path):
    base_dir = tmp_path / "my-base"
    base_dir.mkdir()
    (base_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    services = Services.open(tmp_path / "home", local_base_model=str(base_dir))
    models = services.models
    ft = "ft:my-base:toy:ftjob-1"
    models.register(ft, kind="fine-tuned", base=str(base_dir), path=tmp_path / "a", job_id="ftjob-1")
    models.register(f"{ft}:ckpt-step-5", kind="checkpoint", base=str(base_dir), path=tmp_path / "c", job_id="ftjob-1")
    listed = {m["id"]: m for m in models.list()}
    assert listed["my-base"] == {
        "id": "my-base",
        "object": "model",
        "created": 0,
        "owned_by": "system",
        "parent": None,
        "root": "my-base",
    }
    assert (listed[ft]["parent"], listed[ft]["root"], listed[ft]["owned_by"]) == ("my-base", "my-base", "user")
    ckpt = listed[f"{ft}:ckpt-step-5"]
    assert (ckpt["parent"], ckpt["root"]) == (ft, "my-base")
    assert models.retrieve(ft) == listed[ft] and models.retrieve("my-base") == listed["my-base"]
