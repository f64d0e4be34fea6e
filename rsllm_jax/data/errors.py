"""The one error type for bad input data.

Every message names the file, the line (or row) where meaningful, the field, what is wrong and
what to do about it, so a user can fix their data without reading our code.
"""
from __future__ import annotations

import os


class DataError(ValueError):
    """Bad, missing or inconsistent input data.

    Attributes mirror the message so callers and tests can inspect them: `path`, `line` (1-based
    text line, or a row number for binary tables when `line_kind='row'`), `field`, `hint`.
    """

    def __init__(self, problem: str, *, path: str | os.PathLike | None = None,
                 line: int | None = None, field: str | None = None, hint: str = "",
                 line_kind: str = "line"):
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        self.line = line
        self.field = field
        self.hint = hint
        where = self.path or "<input>"
        if line is not None:
            where += f", {line_kind} {line}"
        if field is not None:
            where += f", field '{field}'"
        message = f"{where}: {problem}"
        if hint:
            message += f" -> {hint}"
        super().__init__(message)


def missing_file(path: str | os.PathLike, what: str, hint: str = "") -> DataError:
    """The error for a required input file that does not exist."""
    return DataError(f"missing {what}", path=path,
                     hint=hint or "check --data_dir / $RSLLM_DATA_DIR points at the data root")
