"""Debian's English and Japanese manuals as a haystack of real distractor documents.

``apt-get install -y debian-reference-en debian-reference-ja debian-faq debian-faq-ja`` puts HTML chapters under
``/usr/share/debian-reference/`` and ``/usr/share/doc/debian/FAQ/`` (Japanese under ``ja/``). Only the HTML is
used, not the long PDFs, to keep a benchmark run short. Files shipped gzipped are unpacked into a folder.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

HAYSTACK_DIRS = (Path("/usr/share/debian-reference"), Path("/usr/share/doc/debian/FAQ"))
INSTALL_HINT = "apt-get install -y debian-reference-en debian-reference-ja debian-faq debian-faq-ja"


class HaystackMissing(RuntimeError):
    """The Debian manuals are not installed."""


def haystack_files(unpack_dir: Path, roots: tuple[Path, ...] = HAYSTACK_DIRS) -> list[Path]:
    """Every HTML file of Debian's reference and FAQ, English and Japanese, as absolute resolved paths.

    ``*.html.gz`` files are unpacked into ``unpack_dir`` (kept apart per root) and the unpacked copies are
    listed instead. Symbolic links (the FAQ's ``page.html -> page.en.html``) are left out, so that no file is
    counted twice.
    """
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise HaystackMissing(f"{', '.join(missing)} not found; install the haystack with: {INSTALL_HINT}")
    files: list[Path] = []
    for i, root in enumerate(roots):
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            name = path.name.lower()
            if name.endswith((".html", ".htm")):
                files.append(path.resolve())
            elif name.endswith((".html.gz", ".htm.gz")):
                target = unpack_dir / f"{i}-{root.name}" / path.relative_to(root).with_suffix("")
                target.parent.mkdir(parents=True, exist_ok=True)
                with gzip.open(path, "rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                files.append(target.resolve())
    if not files:
        raise HaystackMissing(f"no HTML files under {', '.join(map(str, roots))}; reinstall: {INSTALL_HINT}")
    return files


def language_of(path: Path) -> str:
    """'ja' for the Japanese manuals (``*.ja.html`` or under ``ja/``), else 'en'."""
    return "ja" if ".ja." in path.name or "ja" in path.parts[-3:-1] else "en"
