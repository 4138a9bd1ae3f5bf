"""MkDocs hook: the configuration reference, generated from the provider's configuration model.

operate/configuration.md holds the marker `<!-- config-reference -->`; this hook replaces it with one
table row per setting of `BatchesProviderConfig` (and per field of its nested models), built from
the pydantic fields: their type and constraints, their default, their description, and the
environment variable the shipped run.yaml reads for them. So the reference cannot drift from the
code: a new setting appears in it with the description written next to the field.

The build fails (mkdocs.exceptions.PluginError) when the page lost its marker, or a setting has no
description.
"""

import re
import types
import typing
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = "<!-- config-reference -->"
PAGE = "operate/configuration.md"
TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE} has no {MARKER} for the configuration reference to replace")
    from llama_stack_provider_batches.config import BatchesProviderConfig  # imports the stack: only when needed

    run_yaml = Path(config.config_file_path).parent / "run.yaml"
    return markdown.replace(MARKER, reference_table(BatchesProviderConfig, run_yaml_variables(run_yaml)))


def reference_table(model: type[BaseModel], variables: dict[str, str]) -> str:
    rows = [
        "| setting | type | default | environment variable in run.yaml | description |",
        "|---|---|---|---|---|",
    ]
    for name, field in model.model_fields.items():
        rows.append(row(name, field, variables.get(name)))
        nested = nested_model(field.annotation)
        if nested is not None:
            for inner, inner_field in nested.model_fields.items():
                rows.append(row(f"{name}.{inner}", inner_field, variables.get(f"{name}.{inner}")))
    return "\n".join(rows) + "\n"


def row(name: str, field: FieldInfo, variable: str | None) -> str:
    if not field.description:
        raise PluginError(f"the setting `{name}` has no description: add description= to its Field")
    cells = [f"`{name}`", type_text(field), default_text(field), f"`{variable}`" if variable else "", field.description]
    return "| " + " | ".join(table_cell(cell) for cell in cells) + " |"


def table_cell(text: str) -> str:
    """`text` on one line, its pipes escaped where they would end the cell: outside code spans."""
    parts = text.replace("\n", " ").split("`")
    return "`".join(part if index % 2 else part.replace("|", "\\|") for index, part in enumerate(parts))


def type_text(field: FieldInfo) -> str:
    annotation = field.annotation
    optional = type(None) in typing.get_args(annotation) and isinstance(annotation, types.UnionType)
    if optional:
        kinds = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        text = " or ".join(type_name(kind) for kind in kinds)
    else:
        text = type_name(annotation)
    for constraint in field.metadata:
        if isinstance(constraint, Ge):
            text += f" ≥ {constraint.ge}"
        elif isinstance(constraint, Gt):
            text += f" > {constraint.gt}"
    return f"{text}, or unset" if optional else text


def type_name(annotation: Any) -> str:
    if annotation in TYPE_NAMES:
        return TYPE_NAMES[annotation]
    if typing.get_origin(annotation) is dict:
        key, value = typing.get_args(annotation)
        return f"mapping of {type_name(key)} to {type_name(value)}"
    if nested_model(annotation) is not None:
        return "mapping (its fields below)"
    return str(annotation)


def nested_model(annotation: Any) -> type[BaseModel] | None:
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        return "`{" + ", ".join(f"{key}: {item}" for key, item in value.items()) + "}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def run_yaml_variables(run_yaml: Path) -> dict[str, str]:
    """Setting name -> the environment variable that run.yaml's batches provider reads for it; a field of a
    nested setting as `setting.field` (`kvstore: {backend: kv_default, namespace: "${env.X:=batches}"}`)."""
    text = run_yaml.read_text()
    start = text.index("module: llama_stack_provider_batches")
    block = text[start : text.index("\nstorage:", start)]
    variables = {}
    for setting, field, variable in re.findall(r"^\s+(\w+): (?:\{.*?(\w+): \"?)?\$\{env\.(\w+)", block, re.MULTILINE):
        variables[f"{setting}.{field}" if field else setting] = variable
    return variables
