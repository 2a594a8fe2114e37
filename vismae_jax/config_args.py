"""Parsing of the string argument that `get_config(arg)` receives.

`--config=configs/pretrain.py:demo,batch_size=64` passes "demo,batch_size=64" to the config
file. The first item may name a variant. Every other item is `key=value`, where the key is a
dotted path into the config and must already exist there.
"""

import ast

import ml_collections


def split_arg(
    arg: str | None, variants: tuple[str, ...], default: str
) -> tuple[str, dict[str, str]]:
    """Split `arg` into a variant name and a dict of `key=value` overrides.

    Raises:
        ValueError: the variant is not one of `variants`, or an item is not `key=value`.
    """
    variant = default
    overrides: dict[str, str] = {}
    items = [item.strip() for item in split_top_level(arg or "") if item.strip()]
    for position, item in enumerate(items):
        if "=" not in item:
            if position != 0:
                raise ValueError(
                    f"Config item {item!r} is not key=value; "
                    "only the first item may name a variant."
                )
            if item not in variants:
                raise ValueError(
                    f"Unknown config variant {item!r}; expected one of {', '.join(variants)}."
                )
            variant = item
            continue
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    return variant, overrides


def split_top_level(text: str) -> list[str]:
    """Split `text` at commas that are not inside brackets, so `depths=(2,2,6,2)` stays whole."""
    items, depth, start = [], 0, 0
    for position, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:position])
            start = position + 1
    items.append(text[start:])
    return items


def parse_value(text: str, current: object) -> object:
    """Parse `text` to the type of the field's current value."""
    if isinstance(current, str) or current is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        return value if current is None else str(value)
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"Expected a boolean (true/false), got {text!r}.")
    value = ast.literal_eval(text)
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    """Set each dotted key of `overrides` on `config`.

    Raises:
        KeyError: a key does not exist in the config (a typo must not pass silently).
    """
    for dotted_key, text in overrides.items():
        node = config
        *parents, leaf = dotted_key.split(".")
        for name in parents:
            if name not in node:
                raise KeyError(f"Unknown config key {dotted_key!r}: {name!r} does not exist.")
            node = node[name]
        if leaf not in node:
            raise KeyError(f"Unknown config key {dotted_key!r}: {leaf!r} does not exist.")
        with node.ignore_type():
            node[leaf] = parse_value(text, node[leaf])
