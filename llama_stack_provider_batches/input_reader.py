"""Reading a batch's input file through the stack's Files and Models APIs (the I/O around input_file.py).

    read_checked_input   validation: the file checked line by line, and every model it names looked up
    read_requests        a batch that passed validation, read again to run (after a restart, say)

A file that does not exist, is not the caller's to read or has an id the Files API refuses is the
user's problem: a validation error, or InputFileGone for a running batch. Any other failure of the
Files API (an outage) is raised as it is, for the engine to try again later.
"""

import asyncio

from llama_stack_api import (
    BatchObject,
    Files,
    GetModelRequest,
    Models,
    RetrieveFileContentRequest,
    RetrieveFileRequest,
)
from llama_stack_api.common.errors import ResourceNotFoundError
from openai.types.batch_error import BatchError

from .input_file import MAX_FILE_BYTES, MAX_LISTED_ERRORS, InputIndex, ParsedInput, file_error, parse_input
from .validation import quoted


class InputFileGone(Exception):
    """The input file of a running batch cannot be read any more."""


def is_missing_file(exc: BaseException) -> bool:
    """Whether the Files API refused the file itself: it does not exist, is not the caller's to read,
    or its id is not one the Files API accepts (a 4xx, not an outage)."""
    if isinstance(exc, ResourceNotFoundError | FileNotFoundError | PermissionError | ValueError):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500


async def input_content(files: Files, file_id: str) -> bytes | None:
    """A batch input file's bytes; None if it is larger than MAX_FILE_BYTES (nothing more is read).
    Raises what the Files API raises (is_missing_file tells the caller's problem from an outage)."""
    info = await files.openai_retrieve_file(RetrieveFileRequest(file_id=file_id))
    if info.bytes > MAX_FILE_BYTES:
        return None
    response = await files.openai_retrieve_file_content(RetrieveFileContentRequest(file_id=file_id))
    return bytes(response.body)


async def read_checked_input(files: Files, models: Models, batch: BatchObject) -> ParsedInput:
    """The checked input file of `batch`, or the validation errors that refuse it."""
    try:
        content = await input_content(files, batch.input_file_id)
    except Exception as exc:
        if not is_missing_file(exc):
            raise
        message = f"Cannot find file {quoted(batch.input_file_id)}, or you do not have access to it."  # OpenAI's words
        return ParsedInput(errors=[file_error(message)])
    if content is None:
        return ParsedInput(errors=[file_error(f"The input file is larger than {MAX_FILE_BYTES >> 20} MB.")])
    # Checking 50,000 lines takes a while: a thread keeps the event loop answering meanwhile.
    parsed = await asyncio.to_thread(parse_input, content, batch.endpoint)
    if not parsed.errors:
        parsed.errors.extend(await unknown_models(models, parsed.first_line_of_model))
    return parsed


async def read_requests(files: Files, batch: BatchObject) -> InputIndex:
    """The requests of a batch that passed validation; InputFileGone if its file cannot be read now."""
    try:
        response = await files.openai_retrieve_file_content(RetrieveFileContentRequest(file_id=batch.input_file_id))
    except Exception as exc:
        if is_missing_file(exc):
            raise InputFileGone(batch.input_file_id) from exc
        raise
    parsed = await asyncio.to_thread(parse_input, bytes(response.body), batch.endpoint)
    if parsed.errors:  # files do not change: whatever is under this id now is not the batch's input
        raise InputFileGone(batch.input_file_id)
    return parsed.index


async def unknown_models(models: Models, first_line_of_model: dict[str, int]) -> list[BatchError]:
    """A model_not_found error for each distinct unknown model, at the first line naming it.

    The lookups stop at MAX_LISTED_ERRORS unknown models: a file naming thousands of made-up models
    must not hold a batch slot for a lookup each, nor fill `errors` with them.
    """
    errors: list[BatchError] = []
    for model, line in first_line_of_model.items():
        if len(errors) == MAX_LISTED_ERRORS:
            errors.append(file_error("More models may be unknown; they are not listed.", "model_not_found", None))
            break
        try:
            await models.get_model(GetModelRequest(model_id=model))
        except Exception:
            message = f"The provided model {quoted(model)} is not supported by the Batch API."  # OpenAI's words
            errors.append(BatchError(code="model_not_found", line=line, param="body.model", message=message))
    return errors
