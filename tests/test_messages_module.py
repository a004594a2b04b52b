"""The words for a setting: counts with their nouns, values read from files checked against their
setting's type, and a wrong type told as a flag's is."""

import os
import re

import pytest

import messages_module


def test_plural_counts_one_in_the_singular_and_others_in_the_plural():
    assert [messages_module.plural(n, "file")
            for n in (0, 1, 2)] == ["0 files", "1 file", "2 files"]
    assert messages_module.plural(1, "class folder") == "1 class folder" and messages_module.plural(
        3, "batch", "batches") == "3 batches"


# ------------------------------------------------------------------ values read from files


@pytest.mark.parametrize("value, annotation, ok", [
    (64, int, True), ("64", int, False), (True, int, False), (64.0, int, False), (64, float, True),
    (True, float, False), (None, int | None, True), (None, int, False), (True, bool, True),
    (1, bool, False), (["a", "b"], list[str], True), (["a", 1], list[str], False),
    ("ab", list[str], False), ([0.5, 1], list[float], True), ({"a": 1}, dict, True),
    ([], dict, False)])
def test_values_read_from_files_must_be_exactly_of_their_settings_type(value, annotation, ok):
    assert messages_module.is_of_type(value, annotation) == ok
    if not ok:
        with pytest.raises(ValueError, match=rf"^NAME takes .+, not {re.escape(repr(value))}$"):
            messages_module.check_type("NAME", value, annotation)


def test_a_wrong_type_is_told_in_the_words_a_flag_gets():
    with pytest.raises(ValueError) as error:
        messages_module.check_type("BATCH_SIZE", "64", int | None)
    assert str(error.value) == "BATCH_SIZE takes a whole number or none, not '64'"
    assert messages_module.type_words(list[float]) == "a list, each a number"
    long = messages_module.short_repr("x" * 1000)
    assert long.endswith("...x'") and len(long) <= 60


def test_printable_escapes_control_characters_so_a_name_keeps_its_line_and_sends_no_codes():
    assert messages_module.printable("a\nb\r\t\x1b[31m\x7f\x85.png") == \
        "a\\nb\\r\\t\\x1b[31m\\x7f\\x85.png"
    assert messages_module.printable(os.fsdecode(b"caf\xe9\n")) == "caf\\xe9\\n"
    assert messages_module.printable("zèbre, \"a\" #1.png") == "zèbre, \"a\" #1.png"
