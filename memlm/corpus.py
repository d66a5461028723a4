"""Real prose for haystacks: the Vim manual, as Debian installs it (package `vim-runtime`).

A benchmark whose filler repeats one sentence measures little: a question's tokens match
nothing in it but the needle. The Vim manual is long (about 0.6M tokens of prose), varied and written
for people, and Debian ships it as plain text, so benchmarks read it at run time and nothing
of it is committed here. Where vim-runtime is not installed, `apt-get download` fetches the
package (no root needed) and its files are unpacked under $MEMLM_HOME/corpora.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

from memlm.store.settings import memlm_home

INSTALLED = Path("/usr/share/vim")
PACKAGE = "vim-runtime"
# The user manual first (tutorial prose), then the reference manual.
ORDER = ("usr_*.txt", "*.txt")
SKIPPED = ("version*.txt", "todo.txt")  # patch lists and to-do notes, not prose

_LINK = re.compile(r"\|([^|\s]+)\|")  # |02.1| -> 02.1
_TAG = re.compile(r"\*[^*\s]+\*")  # *usr_02.txt* -> dropped
_WORDY = re.compile(r"[A-Za-z]")


def vim_doc_folder() -> Path:
    """The folder holding the Vim manual's .txt files: installed, or fetched once."""
    for root in (INSTALLED, memlm_home() / "corpora" / "vim-runtime" / "usr" / "share" / "vim"):
        found = sorted(root.glob("vim*/doc/usr_01.txt"))
        if found:
            return found[-1].parent
    return _fetch_vim_runtime()


def _fetch_vim_runtime() -> Path:
    target = memlm_home() / "corpora"
    target.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            f"the benchmarks' prose is the Vim manual (Debian package {PACKAGE}); it is not installed and this "
            "system has no apt-get to fetch it: install vim-runtime (or vim) and run again"
        )
    print(f"memlm: fetching the Vim manual (apt-get download {PACKAGE}) into {target} ...")
    subprocess.run(["apt-get", "download", PACKAGE], cwd=target, check=True, capture_output=True)
    [package] = sorted(target.glob(f"{PACKAGE}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(package), str(target / PACKAGE)], check=True)
    package.unlink()
    [doc] = sorted((target / PACKAGE / "usr" / "share" / "vim").glob("vim*/doc"))[-1:]
    return doc


def clean_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a Vim help file: lines joined, links unwrapped, tags, headings,
    rules and indented examples left out."""
    paragraphs, lines = [], []
    for line in text.splitlines() + [""]:
        prose_line = line.strip() and not line[0].isspace() and not line.startswith(("=", "-", "*")) and not line.isupper()
        if prose_line:
            lines.append(_TAG.sub("", _LINK.sub(r"\1", line)).rstrip(" >").strip())
            continue
        paragraph = " ".join(part for part in lines if part)
        lines = []
        if len(paragraph) >= 120 and len(_WORDY.findall(paragraph)) > 0.6 * len(paragraph):
            paragraphs.append(re.sub(r"\s+", " ", paragraph))
    return paragraphs


@cache
def vim_manual() -> tuple[str, ...]:
    """Every prose paragraph of the Vim manual, user manual first, in reading order."""
    folder = vim_doc_folder()
    seen: set[Path] = set()
    paragraphs: list[str] = []
    for pattern in ORDER:
        for path in sorted(folder.glob(pattern)):
            if path not in seen and not any(path.match(skip) for skip in SKIPPED):
                seen.add(path)
                paragraphs.extend(clean_paragraphs(path.read_text(encoding="utf-8", errors="replace")))
    return tuple(paragraphs)
