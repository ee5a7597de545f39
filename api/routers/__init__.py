"""One router module per resource."""

from typing import Any

from ..schemas import ErrorAnswer

BAD_INPUT: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorAnswer, "description": "Body that cannot be read (e.g. not UTF-8)."},
    413: {"model": ErrorAnswer, "description": "Body larger than the server's limit."},
    422: {"model": ErrorAnswer, "description": "Invalid input; `detail` names the field."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorAnswer, "description": "No such id."},
}
