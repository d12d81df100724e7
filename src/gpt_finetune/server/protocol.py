"""The wire format of request bodies: JSON read safely. What each body may hold is checked by
``request_rules`` (one declaration per field, the same for the CLI and the server)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from ..request_rules import bad


async def read_json(request: Request) -> Any:
    raw = await request.body()
    from ..data.readers import JsonValueError, loads

    try:
        return loads(raw.decode("utf-8"))
    except JsonValueError as exc:  # NaN, lone surrogates, giant integers: not values anything here can use
        raise bad(str(exc), None, "invalid_json") from None
    except (ValueError, RecursionError):
        raise bad(
            "We could not parse the JSON body of your request. Send a JSON object with Content-Type: application/json.",
            None,
            "invalid_json",
        ) from None
