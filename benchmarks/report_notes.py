"""Rebuild a benchmark report without losing the notes written into it by hand.

The benchmark scripts regenerate their Markdown reports from the run files; people then add what the
tables cannot say (what was run by hand, what it led to) below a ``## Notes`` heading. A rebuild keeps
that section: everything from the first line that starts with ``## Notes`` to the end of the old file
is appended to the new text.
"""
from __future__ import annotations

import re
from pathlib import Path

from defectscope.models.model_files import atomic_write

NOTES_HEADING = "## Notes"
_NOTES_START = re.compile(r"^## Notes\b", flags=re.MULTILINE)


def hand_notes(text: str) -> str:
    """The hand-written section of a report: from its first ``## Notes`` line to the end ('' if none)."""
    found = _NOTES_START.search(text)
    return text[found.start():] if found else ""


def write_report(path: Path, text: str) -> None:
    """Write the generated ``text`` to ``path``, keeping the old file's ``## Notes`` section after it.

    The file is replaced atomically, so a crash mid-write leaves the old report (and its notes) intact.
    """
    path = Path(path)
    if _NOTES_START.search(text):
        raise ValueError(f"generated text for {path} contains a '{NOTES_HEADING}' heading, which is kept for "
                         "hand-written notes; give the generated section another name")
    notes = hand_notes(path.read_text()) if path.exists() else ""
    text = text.rstrip("\n") + "\n"
    if notes:
        text += "\n" + notes
    # A temporary file of its own per call (two benchmark processes may rebuild one report at once).
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
