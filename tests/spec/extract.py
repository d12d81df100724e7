"""Copy the schemas the server tests check responses against out of OpenAI's published spec.

    python tests/spec/extract.py ../shared/openai/openapi.yaml

writes tests/spec/openai_schemas.json (each named schema and every schema it refers to).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

NAMES = [
    "OpenAIFile",
    "ListFilesResponse",
    "DeleteFileResponse",
    "FineTuningJob",
    "ListPaginatedFineTuningJobsResponse",
    "FineTuningJobEvent",
    "ListFineTuningJobEventsResponse",
    "FineTuningJobCheckpoint",
    "ListFineTuningJobCheckpointsResponse",
    "Model",
    "ListModelsResponse",
    "DeleteModelResponse",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ErrorResponse",
]
NOTICE = (
    "Schemas copied from OpenAI's OpenAPI specification (https://github.com/openai/openai-openapi), "
    "Copyright (c) OpenAI, released under the MIT License: Permission is hereby granted, free of charge, "
    "to any person obtaining a copy of this software and associated documentation files (the 'Software'), "
    "to deal in the Software without restriction, including without limitation the rights to use, copy, "
    "modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit "
    "persons to whom the Software is furnished to do so, subject to the following conditions: The above "
    "copyright notice and this permission notice shall be included in all copies or substantial portions "
    "of the Software. THE SOFTWARE IS PROVIDED 'AS IS', WITHOUT WARRANTY OF ANY KIND."
)


def refs(node, found):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for v in node.values():
            refs(v, found)
    elif isinstance(node, list):
        for v in node:
            refs(v, found)


def main(spec_path: str) -> None:
    spec = yaml.safe_load(Path(spec_path).read_text())
    schemas = spec["components"]["schemas"]
    todo, keep = list(NAMES), {}
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = schemas[name]
        found: set[str] = set()
        refs(schemas[name], found)
        todo.extend(found - keep.keys())
    out = {"notice": NOTICE, "openapi_version": spec["info"].get("version"), "components": {"schemas": keep}}
    target = Path(__file__).with_name("openai_schemas.json")
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(keep)} schemas -> {target}")


if __name__ == "__main__":
    main(sys.argv[1])
