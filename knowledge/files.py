"""Which files a list of paths names: folders walked recursively, symlinks kept inside their folder.

Only regular files are taken: reading a named pipe waits for a writer for ever, and devices and sockets hold
no document.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from knowledge.loaders import LOADERS


@dataclass
class Discovery:
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, error)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


_NOT_REGULAR = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")]


def not_a_regular_file(mode: int) -> str | None:
    """Why a file of this ``st_mode`` is not read, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    what = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
    return f"is {what}, not a regular file; only regular files are read"


def discover(paths: list[str | Path]) -> Discovery:
    """Files to load, in a stable order, each once; hidden files and folders are left alone."""
    found = Discovery()
    seen: set[Path] = set()

    def take(path: Path) -> None:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            found.files.append(real)

    for given in map(Path, paths):
        try:
            mode = given.stat().st_mode  # of the target, for a symlink
        except OSError:
            what = "broken symlink" if given.is_symlink() else "no such file or folder"
            found.failed.append((str(given), what))
            continue
        if not stat.S_ISDIR(mode):
            if reason := not_a_regular_file(mode):
                found.failed.append((str(given), reason))
            else:
                take(given)
        else:
            root = given.resolve()
            for folder, dirs, names in os.walk(root, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for link in [d for d in dirs if (Path(folder) / d).is_symlink()]:
                    dirs.remove(link)
                    target = (Path(folder) / link).resolve()
                    if not _inside(target, root):
                        found.failed.append((str(Path(folder) / link), f"symlink points outside {root} (to {target})"))
                for name in sorted(n for n in names if not n.startswith(".")):
                    path = Path(folder) / name
                    if path.is_symlink():
                        target = path.resolve()
                        if not target.exists():
                            found.failed.append((str(path), "broken symlink"))
                            continue
                        if not _inside(target, root):
                            found.failed.append((str(path), f"symlink points outside {root} (to {target})"))
                            continue
                    try:
                        reason = not_a_regular_file(path.stat().st_mode)
                    except OSError as e:
                        reason = f"cannot be read ({e.strerror or e})"
                    if reason:
                        found.failed.append((str(path), reason))
                        continue
                    if path.suffix.lower() not in LOADERS:
                        found.skipped.append((str(path), f"unsupported file type {path.suffix or '(none)'}"))
                        continue
                    take(path)
    return found
