"""The command line of a script's constants: a typed --lower-case-name flag for each UPPER_CASE
constant, its --help text read from the comments beside the constants in the script's source."""

import argparse
import difflib
import re
import types
import typing

import messages_module
from messages_module import flag


def _type_name(annotation) -> str:
    """INT for int and int | None, and so on: the metavar of a constant's flag."""
    kinds = (
        typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,))
    return next(k for k in kinds if k is not type(None)).__name__.upper()


def _parse_value(name: str, annotation) -> typing.Callable[[str], typing.Any]:
    """A command-line parser for a constant of the given type (int | None, bool, str, ...)."""
    kinds = (
        typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,))
    optional, kind = type(None) in kinds, next(k for k in kinds if k is not type(None))

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        if kind is bool:
            if text.lower() in ("true", "yes", "on", "1"):
                return True
            if text.lower() in ("false", "no", "off", "0"):
                return False
        else:
            try:
                return kind(text)
            except ValueError:
                pass
        # as a checkpoint's value of the wrong type is told
        allowed = messages_module.type_words(annotation)
        raise argparse.ArgumentTypeError(f"{name} takes {allowed}, not {text!r}")
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse that answers a mistyped flag with the closest ones, not a dump of every option."""

    def error(self, message: str) -> typing.NoReturn:
        flags = [option for action in self._actions for option in action.option_strings]
        if message.startswith("unrecognized arguments: "):
            unknown = [word for word in message.split(": ", 1)[1].split() if word.startswith("-")]
            word = (unknown or message.split(": ", 1)[1].split())[0]
            near = difflib.get_close_matches(word.split("=")[0], flags, n=3, cutoff=0.6)
            message = (f"unknown flag {word}"
                       + (f"; did you mean {' or '.join(near)}?" if near else ""))
        self.exit(2, f"{self.prog}: error: {message}\n(python main.py --help lists every flag)\n")


def documentation(path: str) -> dict[str, tuple[str, str]]:
    """Each constant's comment in the file at path (continuation lines joined) and its group (the
    `# --- Data` line above it), as --help shows them."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    found, group, last = {}, "Constants", None
    for line in lines:
        heading = re.match(r"# --- (.+)$", line)
        constant = re.match(r"([A-Z][A-Z0-9_]*): [^#]*#\s?(.*)$", line)
        more = re.match(r"\s+#\s?(.*)$", line)
        if heading:
            group, last = heading.group(1), None
        elif constant:
            last = constant.group(1)
            found[last] = (constant.group(2).strip(), group)
        elif more and last:
            found[last] = (f"{found[last][0]} {more.group(1).strip()}", group)
        else:
            last = None
    return found


def make_parser(description: str, values: dict[str, typing.Any], annotations: dict[str, typing.Any],
                path: str) -> argparse.ArgumentParser:
    """A parser with a flag for each constant in values (--val-split for VAL_SPLIT), of the type its
    annotation gives, shown by --help with its comment and under its group in the file at path."""
    parser = _Parser(description=description, allow_abbrev=False)
    comments, groups = documentation(path), {}
    for name, value in values.items():
        text, group = comments.get(name, ("", "Constants"))
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        groups[group].add_argument(flag(name), dest=name, metavar=_type_name(annotations[name]),
                                   type=_parse_value(name, annotations[name]),
                                   default=argparse.SUPPRESS,
                                   help=f"{text} [{name}; default {value!r}]".replace("%", "%%"))
    return parser


def as_typed(message: str, given: set[str]) -> str:
    """A message that starts "NAME = value" about a constant the user set by its flag, said as they
    typed it: "--name value (NAME) ..."."""
    match = re.match(r"([A-Z][A-Z0-9_]*) = (\S+)", message)
    if not match or match.group(1) not in given:
        return message
    name, value = match.groups()
    return f"{flag(name)} {value} ({name}){message[match.end():]}"
