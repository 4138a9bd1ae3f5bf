"""Reading a batch's input file through the stack's Files and Models APIs (the I/O around input_file.py).

    read_checked_input   validation: the file checked line by line, and every model it names looked up
                         (in the Models API; for moderations, among the safety API's shields)
    read_requests        a batch that passed validation, read again to run (after a restart, say)

A file that does not exist, is not the caller's to read or has an id the Files API refuses is the
user's problem: a validation error, or InputFileGone for a running batch. Any other failure of the
Files API (an outage) is raised as it is, for the engine to try again later.
"""

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from openai.types.batch_error import BatchError

from ..domain.errors import quoted
from ..domain.outages import is_dependency_outage
from ..stack import (
    BatchObject,
    Files,
    GetModelRequest,
    ResourceNotFoundError,
    RetrieveFileContentRequest,
    RetrieveFileRequest,
    response_bytes,
)
from .input_file import MAX_FILE_BYTES, MAX_LISTED_ERRORS, InputIndex, ParsedInput, file_error, parse_input
from .model_hints import model_hints
from .stack_apis import StackAPIs, unavailable_message


class InputFileGone(Exception):
    """The input file of a running batch cannot be read any more."""


def is_missing_file(exc: BaseException) -> bool:
    """Whether the Files API refused the file itself: it does not exist, is not the caller's to read,
    or its id is not one the Files API accepts (a 4xx, not an outage)."""
    if is_dependency_outage(exc):  # EACCES/ENOENT from a store that lost its volume is the store's, not the user's
        return False
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
    return await response_bytes(response)


async def read_checked_input(
    files: Files, apis: StackAPIs, batch: BatchObject, estimate: Callable[[dict[str, Any]], int] | None = None
) -> ParsedInput:
    """The checked input file of `batch`, or the validation errors that refuse it; with `estimate`, the
    input tokens of each request estimated too."""
    if not apis.serves(batch.endpoint):  # created before the stack's run.yaml lost the API
        return ParsedInput(errors=[file_error(unavailable_message(batch.endpoint), param="endpoint")])
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
    parsed = await asyncio.to_thread(parse_input, content, batch.endpoint, estimate)
    if parsed.errors:
        return parsed
    if batch.endpoint == "/v1/moderations":
        errors, parsed.model = await unknown_moderation_models(apis, parsed.first_line_of_model)
    else:
        errors = await unknown_models(apis, parsed.first_line_of_model)
    parsed.errors.extend(errors)
    return parsed


async def read_requests(files: Files, batch: BatchObject) -> InputIndex:
    """The requests of a batch that passed validation; InputFileGone if its file cannot be read now."""
    try:
        response = await files.openai_retrieve_file_content(RetrieveFileContentRequest(file_id=batch.input_file_id))
    except Exception as exc:
        if is_missing_file(exc):
            raise InputFileGone(batch.input_file_id) from exc
        raise
    parsed = await asyncio.to_thread(parse_input, await response_bytes(response), batch.endpoint)
    if parsed.errors:  # files do not change: whatever is under this id now is not the batch's input
        raise InputFileGone(batch.input_file_id)
    return parsed.index


def model_not_found(model: str | None, line: int, hint: str = "") -> BatchError:
    message = f"The provided model {quoted(model)} is not supported by the Batch API."  # OpenAI's words
    return BatchError(code="model_not_found", line=line, param="body.model", message=message + hint)


MORE_UNKNOWN = "More models may be unknown; they are not listed."


async def unknown_models(apis: StackAPIs, first_line_of_model: dict[str | None, int]) -> list[BatchError]:
    """A model_not_found error for each distinct model the Models API does not know, at the first line naming it,
    with a hint at why where there is one (model_hints.py).

    The lookups stop at MAX_LISTED_ERRORS unknown models: a file naming thousands of made-up models
    must not hold a batch slot for a lookup each, nor fill `errors` with them.
    """
    unknown: list[tuple[str | None, int]] = []
    more = False
    for model, line in first_line_of_model.items():
        if len(unknown) == MAX_LISTED_ERRORS:
            more = True
            break
        try:
            await apis.models.get_model(GetModelRequest(model_id=model or ""))
        except Exception as exc:
            if is_dependency_outage(exc):  # the registry's store is out: a pause, not an unknown model
                raise
            unknown.append((model, line))
    hints = await model_hints(apis, [model for model, _ in unknown])
    errors = [model_not_found(model, line, hints.get(model, "")) for model, line in unknown]
    if more:
        errors.append(file_error(MORE_UNKNOWN, "model_not_found", None))
    return errors


async def unknown_moderation_models(
    apis: StackAPIs, first_line_of_model: dict[str | None, int]
) -> tuple[list[BatchError], str | None]:
    """The moderation models the safety API cannot resolve, and the model the batch's `model` field shows.

    The safety API resolves a moderation's model as here: to the one shield whose provider model it
    is, and a moderation naming no model to run.yaml's `safety.default_shield_id`. The shields are
    those the batch's owner may see (the listing applies the access policy).
    """
    shields = [] if apis.shields is None else (await apis.shields.list_shields()).data
    shields_of_model = Counter(shield.provider_resource_id for shield in shields)
    default_id = apis.default_moderation_model()
    default = next((shield.provider_resource_id for shield in shields if shield.identifier == default_id), None)
    errors: list[BatchError] = []
    for model, line in first_line_of_model.items():
        if len(errors) == MAX_LISTED_ERRORS:
            errors.append(file_error(MORE_UNKNOWN, "model_not_found", None))
            break
        if not model and default is None:
            message = (
                "This line names no model, and the stack has no default moderation model "
                "(`safety.default_shield_id` in its run.yaml): name one in 'body.model'."
            )
            errors.append(BatchError(code="model_not_found", line=line, param="body.model", message=message))
        elif model and shields_of_model[model] != 1:
            errors.append(model_not_found(model, line))
    first = next(iter(first_line_of_model), None)
    return errors, first or default
