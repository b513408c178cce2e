"""The app's form for `DreamBoothConfig`: its "advanced" fields are generated from the dataclass (name, type,
default, help), so a new option appears in the app by itself; and form values convert to options and back."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..config import SECRET_FIELDS, DreamBoothConfig

#: Options set by the main form (photos, subject, base model, mode) or by the app itself (where the run writes).
MAIN_FORM_OPTIONS = (
    "pretrained_model_name_or_path",
    "instance_data_dir",
    "instance_prompt",
    "class_prompt",
    "class_data_dir",
    "output_dir",
    "adapter",
    "identifier",
)

#: How a field shows in the form.
Kind = Literal["checkbox", "number", "integer", "choice", "text", "list", "json"]


@dataclass(frozen=True)
class OptionField:
    """One option of the "advanced" section: how it shows, its default and its help, from the dataclass field."""

    name: str
    kind: Kind
    default: Any
    help: str
    optional: bool
    choices: tuple[str, ...] = ()
    item_type: type = str


def option_fields(config_class: type[DreamBoothConfig] = DreamBoothConfig) -> list[OptionField]:
    """The fields of `config_class` for the "advanced" section, in declaration order: every option but those of
    `MAIN_FORM_OPTIONS` and the secrets (the Hub token has its own password field, never stored)."""
    hints = typing.get_type_hints(config_class)
    fields = []
    for field in dataclasses.fields(config_class):
        if field.name in MAIN_FORM_OPTIONS or field.name in SECRET_FIELDS or not field.init:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        fields.append(_option_field(field.name, hints[field.name], default, field.metadata.get("help", "")))
    return fields


def _option_field(name: str, hint: Any, default: Any, help: str) -> OptionField:
    args = typing.get_args(hint)
    optional = type(None) in args
    concrete = [arg for arg in args if arg is not type(None)] if _is_union(hint) else [hint]
    if len(concrete) > 1:  # e.g. a list of concepts or the path of a file holding them
        return OptionField(name, "json", default, help, optional)
    (kind,) = concrete
    if typing.get_origin(kind) is Literal:
        return OptionField(name, "choice", default, help, optional, tuple(str(c) for c in typing.get_args(kind)))
    if typing.get_origin(kind) is list:
        return OptionField(name, "list", default, help, optional, item_type=typing.get_args(kind)[0])
    if kind is bool:
        return OptionField(name, "checkbox", default, help, optional)
    if kind is int:
        return OptionField(name, "integer", default, help, optional)
    if kind is float:
        return OptionField(name, "number", default, help, optional)
    return OptionField(name, "text", default, help, optional)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def to_form_value(field: OptionField, value: Any) -> Any:
    """An option's value as its form component holds it: lists one item a line, JSON as text, None as an empty
    box."""
    if value is None:
        return None if field.kind == "choice" else ("" if field.kind != "checkbox" else False)
    if field.kind == "list":
        return "\n".join(str(item) for item in value)
    if field.kind == "json":
        return value if isinstance(value, str) else json.dumps(value)
    return value


def from_form_value(field: OptionField, value: Any) -> Any:
    """A form component's value as the option's value; raises `ValueError` naming the option if it cannot be one."""
    try:
        if value is None or (isinstance(value, str) and not value.strip() and field.kind != "checkbox"):
            if field.optional:
                return None
            if field.kind == "text":
                return ""
            raise ValueError("it needs a value")
        if field.kind == "checkbox":
            return bool(value)
        if field.kind == "integer":
            if float(value) != int(float(value)):
                raise ValueError(f"{value} is not a whole number")
            return int(float(value))
        if field.kind == "number":
            return float(value)
        if field.kind == "choice" and str(value) not in field.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(field.choices)}")
        if field.kind == "list":  # one item a line (prompts hold spaces)
            return [field.item_type(item.strip()) for item in str(value).splitlines() if item.strip()]
        if field.kind == "json":
            text = str(value).strip()
            return json.loads(text) if text[:1] in "[{" else text
        return str(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{field.name}`: {error}.") from None


def changed_options(fields: list[OptionField], values: list[Any]) -> dict[str, Any]:
    """The options whose form value differs from their default, by name (what the run's options file holds)."""
    options = {}
    for field, value in zip(fields, values, strict=True):
        option = from_form_value(field, value)
        if option != field.default:
            options[field.name] = option
    return options


def form_values(fields: list[OptionField], config: DreamBoothConfig) -> list[Any]:
    """The form values that show `config`'s options (to open an earlier run, or fill a preset)."""
    return [to_form_value(field, getattr(config, field.name)) for field in fields]
