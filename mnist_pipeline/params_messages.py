"""How a wrong params.yaml is told, in one line: pydantic's validation errors as the dotted key, the value as the file
has it and what the schema allows, one problem at a time in file order, with "did you mean" for a typo. The schema's
sections (mnist_pipeline/params.py) come in as an argument."""

import difflib
import re
from typing import Any

from pydantic import BaseModel

Sections = dict[str, type[BaseModel]]  # a params file's sections by name, each with its schema


def allowed_values(schema: dict) -> str:
    """What a key's JSON schema (pydantic's) allows, in the words of the messages: its description, or 'one of a, b',
    'true or false', 'an integer from 1 to 4', 'a number in (0, 10]', 'a list of 1 to 4 items, each ...'."""
    if "description" in schema:
        return schema["description"]
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    kind = schema.get("type")
    if kind == "boolean":
        return "true or false"
    if kind == "integer":
        low, high = schema["minimum"], schema.get("maximum")
        return f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    if kind == "number":
        low = f"({schema['exclusiveMinimum']}" if "exclusiveMinimum" in schema else f"[{schema['minimum']}"
        high = f"{schema['exclusiveMaximum']})" if "exclusiveMaximum" in schema else f"{schema['maximum']}]"
        return f"a number in {low}, {high}"
    if kind == "array":
        return f"a list of {schema['minItems']} to {schema['maxItems']} items, each {allowed_values(schema['items'])}"
    raise TypeError(f"no words for the schema {schema}: give its field a description")


def allowed_for(model: type[BaseModel], key: str) -> str:
    """What a section's key allows, in words."""
    return allowed_values(model.model_json_schema()["properties"][key])


def closest(word: str, names: list[str], spelling: bool = True) -> str | None:
    """The name a typo most likely meant: the same name in other case, a similar spelling (optimiser → optimizer),
    the initials of a spelled-out name (learning_rate → lr), or the one name it extends or begins
    (dropout_rate → dropout, shift → shift_pixels); None when nothing is that close."""
    word = word.lower()
    if word in names:
        return word
    similar = difflib.get_close_matches(word, names, n=1, cutoff=0.6) if spelling else []
    if similar:
        return similar[0]
    initials = "".join(part[0] for part in re.split(r"[\W_]+", word) if part)
    if len(initials) > 1 and initials in names:
        return initials
    related = [name for name in names if name.startswith(word + "_") or word.startswith(name + "_")]
    return related[0] if len(related) == 1 else None


def did_you_mean(sections: Sections, section: str, key: str) -> str:
    """' (did you mean section.key?)' for an unknown key, or '': the key as another section has it
    (train.val_size → preprocess.val_size), a close key of its own section, or a related key of another.
    Other sections get no spelling matches: across sections those suggest unrelated keys."""
    keys = {name: list(model.model_fields) for name, model in sections.items()}
    others = [name for name in keys if name != section]
    guesses = [(name, key.lower()) for name in [section] + others if key.lower() in keys[name]]
    guesses += [(section, closest(key, keys[section]))]
    guesses += [(name, closest(key, keys[name], spelling=False)) for name in others]
    for name, guess in guesses:
        if guess:
            return f" (did you mean {name}.{guess}?)"
    return ""


def first_unknown(mapping: dict, known) -> tuple[str, Any]:
    """The unknown key to report, the first by name, as text and as it is. YAML keys can be numbers or booleans."""
    unknown = {str(key): key for key in mapping if key not in known}
    word = min(unknown)
    return word, unknown[word]


UNKNOWN_KEY = ("extra_forbidden", "invalid_key")  # pydantic's error types for a key no field has (invalid: not a str)


def rank(sections: Sections, error: dict) -> tuple:
    """The order in which problems are reported, one at a time: unknown sections, missing sections, then section by
    section, group by group, its shape, unknown keys, and its keys in order; the rules across keys last, once every
    key is valid."""
    loc, kind = error["loc"], error["type"]
    top = [name for name in sections if "." not in name]
    if loc[0] not in top or (len(loc) == 1 and kind in UNKNOWN_KEY):
        return (0,)
    if len(loc) == 1 and kind == "missing":
        return (1, top.index(loc[0]))
    order, group = [top.index(loc[0])], str(loc[0])
    for depth, key in enumerate(loc[1:], start=1):
        if group not in sections:  # inside a value (a dataset file's mapping): ranked as that value
            break
        last = depth == len(loc) - 1
        order += [1, 0] if last and kind in UNKNOWN_KEY else [2, list(sections[group].model_fields).index(key)]
        group = f"{group}.{key}"
    if group in sections and kind not in ("missing", "value_error"):
        order += [0, 0]  # the group itself is no mapping: before its keys
    return (3 if kind == "value_error" and group in sections else 2, *order)


def describe_problem(sections: Sections, error: dict, raw: dict) -> str:
    """pydantic's error as the one-line message users see, for every error type: the dotted key, the value as
    params.yaml has it (a list or mapping whole, not the item pydantic blames) and what is allowed."""
    loc, kind = error["loc"], error["type"]
    top = [name for name in sections if "." not in name]
    if rank(sections, error) == (0,):
        name = first_unknown(raw, top)[0]
        guess = closest(name, top)
        hint = f" (did you mean '{guess}'?)" if guess else ""
        return f"unknown section '{name}'{hint}; the sections are: {', '.join(top)}"
    depth = max(i for i in range(1, len(loc) + 1) if ".".join(map(str, loc[:i])) in sections)
    group, rest, value = ".".join(map(str, loc[:depth])), loc[depth:], raw
    for part in loc[:depth]:
        value = value[part]
    if not rest:
        if kind == "missing":
            return f"missing section '{group}'"
        if kind == "value_error":  # a model_validator's rule across keys: its own words
            return str(error["ctx"]["error"])
        return f"section '{group}' must be a mapping of keys to values, got {value!r}"
    keys = sections[group].model_fields
    if len(rest) == 1 and kind in UNKNOWN_KEY:
        word, key = first_unknown(value, keys)
        return (
            f"unknown key {group}.{word} = {value[key]!r}{did_you_mean(sections, group, word)}; "
            f"the keys of '{group}' are: {', '.join(keys)}"
        )
    key = rest[0]
    if len(rest) == 1 and kind == "missing":
        return f"missing key {group}.{key} (expected {allowed_for(sections[group], key)})"
    return f"{group}.{key} = {value[key]!r} is not allowed; expected {allowed_for(sections[group], key)}"
