"""DATASET "csv": a CSV file of image paths and labels (and optional splits) listed and checked as
folder_module lists a photo tree (same cache, checks, messages); bad rows are named by line."""

from __future__ import annotations

import errno
import os
import stat
import sys
import warnings

import pandas

import messages_module
from folder_module import SPLITS, Listing
from image_module import IMAGE_EXTENSIONS, DataError
from messages_module import flag_named
from walk_module import Skipped


def column_names(text: str) -> list[str] | None:
    """CSV_COLUMNS' names (path, label, optional split); None unless 2 or 3, distinct, non-empty."""
    names = [name.strip() for name in text.split(",")]
    return names if len(names) in (2, 3) and all(names) and len(set(names)) == len(names) else None


def list_csv(csv_path: str, columns: str) -> Listing:
    """The CSV's image files by split (its split column's, else train), in CSV order, labelled by
    their places in the train rows' sorted labels (as ImageFolder sorts class folders). A path is
    relative to the CSV's folder, or absolute; regular image files are listed, none opened; a
    dangling link, FIFO, socket, device or non-image file is skipped as a folder walk skips it
    (walk_module.SKIPS). DataError naming the line for a row without path or label, a missing file,
    an unknown split, a label the train rows lack, or an image listed twice."""
    names = column_names(columns)
    assert names is not None, "DataConfig checks CSV_COLUMNS"
    frame = _read(csv_path)
    missing = [name for name in names[:2] if name not in frame.columns]
    if missing:
        raise DataError(f"{csv_path} line 1: no column {missing[0]!r} (it has "
                        f"{', '.join(map(repr, frame.columns))}); name its columns "
                        f"{','.join(names)} or set {flag_named('CSV_COLUMNS')} to yours")
    table = [frame[name].tolist() for name in frame.columns]  # lists: quicker to read than a frame
    column = dict(zip(frame.columns, table))
    split_name = names[2] if len(names) == 3 else None
    splits_of = column.get(split_name, [""] * len(frame))
    others = [name for name in frame.columns if name not in names]
    if split_name is not None and split_name not in column and others:  # named otherwise?
        print(f"note: {messages_module.printable(csv_path)} has no column {split_name!r}, so every "
              f"row is in the train split; if {' or '.join(map(repr, others))} holds the splits, "
              f"set {flag_named('CSV_COLUMNS')} to name it", file=sys.stderr)
    rows, folder, skipped, first = [], os.path.dirname(csv_path), Skipped(), {}
    next_line = 2  # after the header; blank lines are rows, and quoted line breaks move the rest
    for path, label, split, *cells in zip(column[names[0]], column[names[1]], splits_of, *table):
        line, next_line = next_line, next_line + 1 + sum(cell.count("\n") for cell in cells)
        if not any(cells):  # a blank line
            continue
        where, split = f"{csv_path} line {line}", split or "train"
        if split not in SPLITS:
            raise DataError(f"{where}: the split {split!r} is not known; use train, val or test "
                            "(or leave it empty for train)")
        if not label.strip():
            raise DataError(f"{where}: the label is empty; give the row its label")
        if messages_module.CONTROL.search(label):
            raise DataError(f"{where}: the label {label!r} holds a control character (a line "
                            "break, a tab); remove it")
        if not path:
            raise DataError(f"{where}: the path is empty; give the row its image file")
        path = os.path.join(folder, path)  # an absolute path stays as it is
        file = _listed(path, where, skipped)
        if file and first.setdefault(file, line) != line:  # else it could train and validate
            raise DataError(f"{where}: {messages_module.printable(path)} is the image of line "
                            f"{first[file]} too; list each image once")
        rows.append((path, label, split, where, file))
    classes = sorted({label for _, label, split, _, _ in rows if split == "train"})
    if not classes:
        raise DataError(f"{csv_path} has no train rows; add some (the split column train or empty)")
    label_of = {name: i for i, name in enumerate(classes)}
    splits = {split: [] for split in SPLITS if any(row[2] == split for row in rows)}
    for path, label, split, where, listed in rows:
        if label not in label_of:
            raise DataError(f"{where}: the label {label!r} has no train rows, so the model cannot "
                            "learn it; add some or remove the row")
        if listed:
            splits[split].append((path, label_of[label]))
    places = {split: f"{csv_path}'s {split} split" for split in SPLITS}
    return Listing(classes, splits, skipped, folder or ".", places, "class")


def _read(csv_path: str):
    """The CSV as a DataFrame of text, fields as written but the spaces after a comma ("NA" a label,
    not missing), blank lines kept as empty rows (their lines count); DataError if unreadable."""
    try:
        mode = os.stat(csv_path).st_mode
        # only a regular file is read: a FIFO would wait for a writer for ever, /dev/zero never end
        with warnings.catch_warnings():  # a row longer than the header: an error, not lost data
            warnings.simplefilter("error", pandas.errors.ParserWarning)
            frame = pandas.read_csv(csv_path, dtype=str, na_filter=False, index_col=False,
                                    skip_blank_lines=False, skipinitialspace=True,
                                    encoding="utf-8-sig") if stat.S_ISREG(mode) else None
    except FileNotFoundError:
        raise DataError(f"{flag_named('DATA_DIR')} {csv_path} does not exist; point it at a CSV "
                        "file of paths and labels") from None
    except (OSError, UnicodeDecodeError, ValueError, pandas.errors.ParserWarning) as error:
        reason = str(error).replace("Error tokenizing data. C error: ", "").strip()
        raise DataError(f"cannot read {csv_path} as a UTF-8 CSV file ({reason}); fix it, or point "
                        f"{flag_named('DATA_DIR')} at another") from None
    if frame is None:
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise DataError(f"{flag_named('DATA_DIR')} {csv_path} is {what}; with "
                        f"{flag_named('DATASET')} csv, point it at a CSV file of paths and labels")
    frame.columns = [str(name).strip() for name in frame.columns]
    return frame


def _listed(path: str, where: str, skipped: Skipped) -> tuple[int, int] | None:
    """A row's regular image file to list, as (device, inode): the same for every path to it; a
    link to nothing, a file that is not regular or not an image, or a path too long is counted in
    skipped instead (None). DataError naming the row when nothing is there (or it is a folder)."""
    try:
        status = os.stat(path)
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        if getattr(error, "errno", None) == errno.ENAMETOOLONG:
            skipped.add("path too long", path)
            return None
        if os.path.islink(path):
            skipped.add("dangling link", path)
            return None
        reason = getattr(error, "strerror", None) or error
        raise DataError(f"{where}: {messages_module.printable(path)} cannot be read ({reason}); "
                        "correct the path (relative to the CSV's folder, or absolute) "
                        "or remove the row") from None
    if stat.S_ISDIR(status.st_mode):
        raise DataError(f"{where}: {messages_module.printable(path)} is a folder; name an image "
                        "file in it, or remove the row")
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        skipped.add("not an image", path)
    elif not stat.S_ISREG(status.st_mode):  # opening a FIFO would wait for a writer for ever
        skipped.add("not a regular file", path)
    else:
        return status.st_dev, status.st_ino
    return None
