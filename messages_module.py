"""The words of a message to the user: a bad setting's choices, range or type, a flag, a count
with its noun, a file name made printable; and the checks of a config's fields that raise them."""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any, Callable, Sequence


def not_known(name: str, value: Any, choices: Any, *, closest: bool = False) -> str:
    """The one message for a value not among the choices; with closest (for long lists, such as
    model names), only the nearest names are offered."""
    choices = list(choices)
    if closest:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=5, cutoff=0.5)
        offer = (f"the closest are {', '.join(near)}" if near
                 else f"there are {len(choices)} to choose from")
        return f"{name} = {value!r} is not known; {offer}"
    return f"{name} = {value!r} is not known; choose one of {', '.join(map(repr, choices))}"


def flag(name: str) -> str:
    """The command-line flag of main.py's constant: --val-split for VAL_SPLIT."""
    return "--" + name.lower().replace("_", "-")


def flag_named(name: str) -> str:
    """A constant's flag with its name beside it: "--val-split (VAL_SPLIT)"."""
    return f"{flag(name)} ({name})"


def plural(n: int, word: str, many: str | None = None) -> str:
    """A count with its noun, singular for one; `many` is a plural that is not word + "s"."""
    return f"{n} {word if n == 1 else many or word + 's'}"


CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # control characters: no label holds one


def printable(name: str) -> str:
    """A file name as text any file or terminal takes: non-UTF-8 bytes (os.fsdecode's surrogates)
    as \\xNN, control characters escaped (a name keeps its line, sends the terminal no codes).
    For what is written or printed, never for opening."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte stands for
        raw = name.encode("utf-8", "backslashreplace")
    return CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(),
                       raw.decode("utf-8", "backslashreplace"))


Rules = dict[str, tuple[Callable[[Any], bool], str]]  # a setting's name: (test, what is allowed)
TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text",
              dict: "a table of names and values"}


def type_words(annotation: Any) -> str:
    """What a setting of this type takes, in words: "a whole number or none" for int | None."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        kinds = typing.get_args(annotation)
        words = " or ".join(type_words(kind) for kind in kinds if kind is not type(None))
        return words + (" or none" if type(None) in kinds else "")
    if typing.get_origin(annotation) is list:
        return f"a list, each {type_words(typing.get_args(annotation)[0])}"
    return TYPE_WORDS[annotation]


def is_of_type(value: Any, annotation: Any) -> bool:
    """Whether value is exactly of the annotation's type, as JSON or a checkpoint holds it: a bool
    is not a number, a whole number is a number, "64" is text."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return any(is_of_type(value, kind) for kind in typing.get_args(annotation))
    if origin is list:
        item_type = typing.get_args(annotation)[0]
        return isinstance(value, list) and all(is_of_type(item, item_type) for item in value)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


def check_type(name: str, value: Any, annotation: Any) -> None:
    """Raise ValueError unless is_of_type: "BATCH_SIZE takes a whole number, not '64'"."""
    if not is_of_type(value, annotation):
        raise ValueError(f"{name} takes {type_words(annotation)}, not {short_repr(value)}")


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value) cut to about limit characters: a file's value can be any size, a message is one
    line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]}...{text[-2:]}"


def check_fields(config: Any, rules: Rules,
                 choices: dict[str, Sequence[Any]] | None = None) -> None:
    """Raise ValueError naming the first field that is not among its choices or breaks its rule, by
    the main.py constant that sets it (VAL_SPLIT for val_split)."""
    for name, allowed in (choices or {}).items():
        if getattr(config, name) not in allowed:
            raise ValueError(not_known(name.upper(), getattr(config, name), allowed))
    for name, (test, allowed) in rules.items():
        if not test(getattr(config, name)):
            raise ValueError(f"{name.upper()} = {getattr(config, name)!r} "
                             f"is out of range: use {allowed}")
