"""Config layers merged over a structured schema, OmegaConf's errors turned into
one :class:`~contlearn.errors.ConfigError` each, naming the key and what is
valid there (OmegaConf's own words name node types, or nothing)."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, cast

from omegaconf import BooleanNode, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from contlearn.errors import ConfigError, choices


def is_structured(cls: Any) -> bool:
    """Whether ``cls`` is a class OmegaConf takes as a schema: a dataclass or an attrs class."""
    return isinstance(cls, type) and (dataclasses.is_dataclass(cls) or hasattr(cls, "__attrs_attrs__"))


def field_names(cls: Any) -> list[str]:
    """The field names of a structured class."""
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    import attr

    return [a.name for a in attr.fields(cls)]


def field_defaults(cls: Any) -> dict[str, Any]:
    """The fields of a structured class and their defaults (:data:`dataclasses.MISSING` for none)."""
    if dataclasses.is_dataclass(cls):
        return {
            f.name: f.default if f.default is not dataclasses.MISSING
            else f.default_factory() if f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
            else dataclasses.MISSING
            for f in dataclasses.fields(cls)
        }  # fmt: skip
    import attr

    return {
        a.name: a.default.factory() if isinstance(a.default, attr.Factory)  # type: ignore[arg-type]
        else dataclasses.MISSING if a.default is attr.NOTHING else a.default
        for a in attr.fields(cls)
    }  # fmt: skip


def _valid_keys(schema: Any, full_key: str) -> list[str]:
    """The valid keys of the config section that holds ``full_key``."""
    node: Any = schema
    for part in str(full_key).split(".")[:-1]:
        if not is_structured(node):
            return []
        node = typing.get_type_hints(node).get(part)
    return field_names(node) if is_structured(node) else []


def first_line(text: str) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else ""


def merge_checked(schema: Any, *layers: Any, where: str = "") -> DictConfig:
    """Merge layers over a structured schema, turning OmegaConf errors into
    :class:`ConfigError` messages that name the key and the valid choices."""
    try:
        merged = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(schema), *layers))  # over a structured class
        _check_booleans(merged, layers, where)
        return merged
    except ConfigKeyError as exc:
        full_key = f"{where}{exc.full_key}" if exc.full_key else where.rstrip(".")
        valid = _valid_keys(schema, str(exc.full_key))
        in_list = _key_in_a_list(schema, layers, exc, where)
        if in_list is not None:
            full_key, valid = in_list
        hint = ""
        key, _, value = full_key.rpartition(".")[2].partition(":")
        if value and key in valid:  # `x={lam:5}` is YAML for the key 'lam:5'
            hint = f" (in YAML, a ':' in a mapping needs a space after it: {{{key}: {value}}}, not {{{key}:{value}}})"
        raise ConfigError(f"unknown config key '{full_key}'; valid keys here: {choices(valid)}{hint}") from None
    except ValidationError as exc:
        if not exc.full_key:  # OmegaConf says nothing when a section is given a plain value
            section = _section_given_a_value(schema, layers)
            if section is not None:
                raise ConfigError(
                    f"'{where}{section}' is a section: set its keys ({where}{section}.KEY=VALUE), not a value"
                ) from None
        full_key = f"{where}{exc.full_key}" if exc.full_key else where.rstrip(".")
        in_list = _key_in_a_list(schema, layers, exc, where)
        if in_list is not None:
            full_key = in_list[0]
        message = exc.msg or str(exc)  # None when a section is given another section (plugins.x=${train})
        other = re.search(r"(\w+) is not a subclass of \w+", message)
        if other is not None:
            raise ConfigError(
                f"wrong value for '{full_key}': a section takes its own fields, not another section "
                f"(got the fields of a {other.group(1)})"
            ) from None
        if "is not a ListConfig" in message:  # OmegaConf's words for a plain value given to a list
            # the key in the layers: OmegaConf names one inside a list of mappings by its last part
            value = _given_value(layers, full_key[len(where):] if full_key.startswith(where) else str(exc.full_key))
            raise ConfigError(
                f"wrong value for '{full_key}': expected a list in brackets, e.g. {full_key}=[{value}], got {value}"
            ) from None
        raise ConfigError(f"wrong value for '{full_key.rstrip('.')}': {first_line(message)}") from None
    except OmegaConfBaseException as exc:
        at = f" at {where.rstrip('.')}" if where else ""
        raise ConfigError(f"invalid config{at}: {first_line(exc.msg or str(exc))}") from None
    except TypeError as exc:  # OmegaConf's "Cannot merge incompatible container types", without the key
        raise container_mismatch_error(OmegaConf.structured(schema), layers, exc, where) from None


def _check_booleans(node: DictConfig, layers: tuple[Any, ...], where: str, prefix: str = "") -> None:
    """:raises ConfigError: a number other than 0 or 1 given for a boolean
    (OmegaConf takes any number: ``train.amp=2`` would be true)."""
    for name in node.keys():
        child, key = node._get_node(name), f"{prefix}{name!s}"
        if isinstance(child, BooleanNode):
            given = _given_value(layers, key)
            if isinstance(given, (int, float)) and not isinstance(given, bool) and given not in (0, 1):
                raise ConfigError(f"wrong value for '{where}{key}': expected true or false, got {given}")
        elif isinstance(child, DictConfig):
            _check_booleans(child, layers, where, f"{key}.")


def container_mismatch_error(base: DictConfig, layers: tuple[Any, ...], exc: TypeError, where: str = "") -> ConfigError:
    """The error for layers merged over ``base`` that give a list where it has a
    mapping or the reverse (OmegaConf's TypeError does not say where)."""
    found = _container_mismatch(base, layers)
    if found is None:
        return ConfigError(f"invalid config{f' at {where}' if where else ''}: {exc}")
    key = f"{where}{found[0]}"
    wanted = f"a list in brackets, e.g. {key}=[1,2]" if found[1] == "list" else f"a mapping, e.g. {key}.KEY=VALUE"
    return ConfigError(f"wrong value for '{key}': expected {wanted}")


def _container_mismatch(schema: DictConfig, layers: tuple[Any, ...]) -> tuple[str, str] | None:
    """The first key a layer gives a mapping where the schema (or an earlier
    layer, for the free-form plugin sections) has a list, or a list where it has
    a mapping, and what is wanted there ("list" or "mapping")."""

    def walk(node: Any, given: Any, prefix: str) -> tuple[str, str] | None:
        for key, value in given.items():
            child = node._get_node(key) if isinstance(node, DictConfig) else None
            path = f"{prefix}{key}"
            if isinstance(child, ListConfig) and isinstance(value, (dict, DictConfig)):
                return path, "list"
            if isinstance(child, DictConfig) and isinstance(value, (list, ListConfig)):
                return path, "mapping"
            if isinstance(child, DictConfig) and isinstance(value, (dict, DictConfig)):
                found = walk(child, value, f"{path}.")
                if found is not None:
                    return found
        return None

    merged = schema
    for layer in layers:
        if isinstance(layer, (dict, DictConfig)):
            found = walk(merged, layer, "")
            if found is not None:
                return found
            try:
                merged = cast(DictConfig, OmegaConf.merge(merged, layer))  # a mapping over a mapping
            except (OmegaConfBaseException, TypeError):
                return None
    return None


def _key_in_a_list(
    schema: Any, layers: tuple[Any, ...], exc: OmegaConfBaseException, where: str
) -> tuple[str, list[str]] | None:
    """The full key and the valid keys of an error about a key of a dataclass inside
    a list (SSD's forget events), whose path OmegaConf's ``full_key`` lost; None for
    any other error."""
    owner = getattr(exc, "object_type", None)
    key = getattr(exc, "key", None)
    if not is_structured(owner) or owner is schema or key is None or "." in str(exc.full_key):
        return None
    path = _path_in_lists(layers, str(key))
    if path is None:
        return None
    return f"{where}{path}", field_names(owner)


def _path_in_lists(layers: tuple[Any, ...], key: str) -> str | None:
    """Where the layers give ``key`` in a mapping inside a list (``forget[0].key``)."""

    def walk(node: Any, prefix: str, in_list: bool) -> str | None:
        if isinstance(node, (dict, DictConfig)):
            if in_list and key in node:
                return f"{prefix}.{key}" if prefix else key
            for k, v in node.items():
                found = walk(v, f"{prefix}.{k!s}" if prefix else str(k), False)
                if found:
                    return found
        elif isinstance(node, (list, ListConfig)):
            for i, v in enumerate(node):
                found = walk(v, f"{prefix}[{i}]", True)
                if found:
                    return found
        return None

    for layer in reversed(layers):
        found = walk(layer, "", False)
        if found:
            return found
    return None


def _given_value(layers: tuple[Any, ...], key: str) -> Any:
    """The value the last layer that sets ``key`` gives it."""
    for layer in reversed(layers):
        try:
            value = OmegaConf.select(OmegaConf.create(layer) if isinstance(layer, dict) else layer, key)
        except OmegaConfBaseException:
            continue
        if value is not None:
            return value
    return None


def _section_given_a_value(schema: Any, layers: tuple[Any, ...]) -> str | None:
    hints = typing.get_type_hints(schema)
    sections = {name for name in field_names(schema) if is_structured(hints.get(name))}
    for layer in layers:
        for key in sections:
            value = layer.get(key) if isinstance(layer, (DictConfig, dict)) else None
            if value is not None and not isinstance(value, (DictConfig, dict)):
                return key
    return None
