"""Folders walked for image files (links followed, each real folder once); what was passed over."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from PIL import Image

import messages_module
from image_module import IMAGE_EXTENSIONS, DataError

# bytes a path may have, its NUL included (Linux: 4,096): a longer one cannot be opened
# (ENAMETOOLONG), so a walk skips it
PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 32767
SKIPS = {  # why a walk or a decode passes a file (or folder) over: what one and many are called
    "not an image": ("file that is not an image", "files that are not images"),
    "outside the classes": ("file outside the class folders", "files outside the class folders"),
    "not a regular file": ("file that is not a regular file (a FIFO, socket or device)",
                           "files that are not regular files (FIFOs, sockets or devices)"),
    "dangling link": ("link whose target is missing or unreachable",
                      "links whose targets are missing or unreachable"),
    "folder read already": ("link to a folder read already", "links to folders read already"),
    "cannot list": ("folder that cannot be listed", "folders that cannot be listed"),
    "path too long": (f"path longer than the system allows ({PATH_MAX} bytes)",
                      f"paths longer than the system allows ({PATH_MAX} bytes)"),
    "unreadable": ("unreadable image file", "unreadable image files"),
    "too many pixels": ("image of more pixels than PIL.Image.MAX_IMAGE_PIXELS",
                        "images of more pixels than PIL.Image.MAX_IMAGE_PIXELS"),
}


@dataclass
class Skipped:
    """What a walk or decode passed over: each reason's (SKIPS key) paths, in the order met."""

    paths: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: str) -> None:
        assert reason in SKIPS, f"no such reason to skip a file: {reason}"
        self.paths.setdefault(reason, []).append(path)

    def every_path(self) -> set[str]:
        """The paths skipped, for every reason."""
        return {path for paths in self.paths.values() for path in paths}

    def warnings(self) -> list[str]:
        """A line per reason: "skipped 2 unreadable image files, e.g. a/b.png" (names printable)."""
        lines = []
        for reason, (one, many) in SKIPS.items():
            paths = self.paths.get(reason, [])
            if not paths:
                continue
            detail = ""
            if reason == "not an image":
                extensions = sorted({os.path.splitext(path)[1].lower() or "(none)"
                                     for path in paths})
                kind = "extension" if len(extensions) == 1 else "extensions"
                detail = f" ({kind} {', '.join(extensions)})"
            elif reason == "too many pixels":
                detail = f" ({Image.MAX_IMAGE_PIXELS:,})"
            example = ": " if len(paths) == 1 else ", e.g. "
            lines.append(f"skipped {messages_module.plural(len(paths), one, many)}{detail}{example}"
                         f"{messages_module.printable(paths[0])}")
        return lines


def walk_images(roots: list[str], skipped: Skipped) -> list[list[str]]:
    """Each root's image files, recursively: folders in sorted(os.walk) order, files by name; only
    regular files with an image extension, the rest (SKIPS) counted in skipped, never opened. Folder
    links are followed; each real folder is read once, for one root: the roots' own folders first,
    then those only links reach, for the root holding the first link. So a link elsewhere (another
    disk) adds its images, one into the tree adds nothing twice. A link to a folder on its own path
    (itself, a parent, one the walk came through) would loop: DataError, naming it."""
    walk = _Walk(skipped, [[] for _ in roots])
    tops = [walk.read(root, r) for r, root in enumerate(roots)]
    if walk.links:
        walk.follow_links(roots, tops)
    return [[os.path.join(folder, name) for folder, names in sorted(folders, key=lambda f: f[0])
             for name in names] for folders in walk.found]


Identity = tuple[int, int]  # a folder's (device, inode): the same whatever path or link leads to it


@dataclass
class _Listing:
    """A folder's entries a walk goes on with (names, sorted): images, subfolders, folder links."""

    files: list[str]
    folders: list[str]
    links: list[str]


@dataclass
class _Walk:
    """walk_images' state: what it skipped, each root's (folder, image names), and per folder read
    its root, listing and subfolders' identities by name."""

    skipped: Skipped
    found: list[list[tuple[str, list[str]]]]
    root_of: dict[Identity, int] = field(default_factory=dict)
    listings: dict[Identity, _Listing] = field(default_factory=dict)
    below: dict[Identity, dict[str, Identity]] = field(default_factory=dict)
    links: bool = False  # whether a folder read holds a link to a folder

    def read(self, top: str, root: int) -> Identity | None:
        """Read top and its subfolders (not links) for root, but those read already (a root twice, a
        linked folder, a bind mount: counted in skipped). Returns top's identity (None when it
        cannot be listed)."""
        stack: list[tuple[str, Identity | None]] = [(top, None)]  # a folder, and the one above it
        first = None
        while stack:
            path, above = stack.pop()
            listed = _list_folder(path, self.skipped)
            if listed is None:
                continue
            identity, listing = listed
            first = first or identity
            if identity in self.root_of:
                self.skipped.add("folder read already", path)
                continue
            self.root_of[identity], self.listings[identity] = root, listing
            self.below[identity] = {}
            if above is not None:
                self.below[above][os.path.basename(path)] = identity
            self.found[root].append((path, listing.files))
            stack += [(os.path.join(path, name), identity) for name in reversed(listing.folders)]
            self.links |= bool(listing.links)
        return first

    def follow_links(self, roots: list[str], tops: list[Identity | None]) -> None:
        """Depth-first from each root through subfolders and links, each folder once: reads folders
        only links reach; refuses a link to a folder on its own path (an endless loop)."""
        finished: set[Identity] = set()  # folders whose walk is over: all below them was seen
        for root, top in zip(roots, tops):
            way: list[tuple[Identity, str]] = []  # the folders walked through to here; real paths
            stack: list[tuple[str, Identity | None, str] | None] = [
                (root, top, os.path.realpath(root))]
            while stack:
                entry = stack.pop()
                if entry is None:  # all below way[-1] seen
                    finished.add(way.pop()[0])
                    continue
                path, identity, real = entry
                if identity is None or identity in finished or any(identity == i for i, _ in way):
                    continue
                way.append((identity, real))
                stack.append(None)
                listing, below = self.listings[identity], self.below[identity]
                for name in reversed(listing.links):
                    stack += self._follow(os.path.join(path, name), self.root_of[identity], way)
                stack += [(os.path.join(path, name), below.get(name), os.path.join(real, name))
                          for name in reversed(listing.folders)]

    def _follow(self, link: str, root: int,
                way: list[tuple[Identity, str]]) -> list[tuple[str, Identity, str]]:
        """A folder link met on `way` in a folder of root: DataError when it leads to a folder on
        that way or above one; else its target read for root (unless read already), and the folders
        the walk enters next."""
        target = os.path.realpath(link)
        if any(real == target or real.startswith(os.path.join(target, "")) for _, real in way):
            raise DataError(f"{messages_module.printable(link)} is a link to "
                            f"{messages_module.printable(target)}, a folder on its own path, "
                            "so a walk through it would never end; remove the link, "
                            "or point it at a folder outside that path")
        identity = self.read(link, root)  # or counted as read already: walked still, for loops
        return [] if identity is None else [(link, identity, target)]


def _list_folder(path: str, skipped: Skipped) -> tuple[Identity, _Listing] | None:
    """A folder's identity (device, inode) and listing, its other entries counted in skipped; None
    (also counted) when it cannot be listed."""
    try:
        status = os.stat(path)
        with os.scandir(path) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError as error:
        skipped.add("path too long" if error.errno == errno.ENAMETOOLONG else "cannot list", path)
        return None
    listing = _Listing([], [], [])
    for entry in entries:
        try:
            if len(os.fsencode(entry.path)) >= PATH_MAX:
                skipped.add("path too long", entry.path)
            elif entry.is_dir():  # a link to a folder too
                (listing.links if entry.is_symlink() else listing.folders).append(entry.name)
            elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                skipped.add("not an image", entry.path)
            elif entry.is_file():  # a regular file, or a link to one
                listing.files.append(entry.name)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                skipped.add("dangling link", entry.path)
            else:  # opening a FIFO would wait for a writer for ever; a device may never end
                skipped.add("not a regular file", entry.path)
        except OSError:  # a link whose target cannot be looked at (a loop of links, no permission)
            skipped.add("dangling link", entry.path)
    return (status.st_dev, status.st_ino), listing
