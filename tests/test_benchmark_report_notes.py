"""benchmarks/report_notes.py: rebuilding a benchmark report keeps the notes written into it by hand."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "report_notes.py"
_spec = importlib.util.spec_from_file_location("report_notes", _FILE)
report_notes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report_notes)


def test_a_rebuild_keeps_the_notes_section_and_replaces_the_tables(tmp_path):
    path = tmp_path / "report.md"
    report_notes.write_report(path, "# Report\n\n| a |\n|---|\n| 1 |\n")
    notes = "## Notes (by hand)\n\nSeed 3 was run by hand.\n\n### Later\n\nmore\n"
    path.write_text(path.read_text() + "\n" + notes)

    report_notes.write_report(path, "# Report\n\n| a |\n|---|\n| 2 |")
    text = path.read_text()
    assert "| 2 |" in text and "| 1 |" not in text
    assert text.endswith(notes)
    assert text.index("| 2 |") < text.index("## Notes")
    # A second rebuild does not duplicate the notes.
    report_notes.write_report(path, "# Report\n\n| a |\n|---|\n| 3 |\n")
    assert path.read_text().count("## Notes") == 1 and path.read_text().endswith(notes)


def test_without_notes_the_file_is_the_generated_text(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("# Old\n\nNotes inline, not a heading: ## Notes\n### Notes is a sub-heading\n")
    report_notes.write_report(path, "# New\n")
    assert path.read_text() == "# New\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_generated_text_may_not_claim_the_notes_heading(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("# Old\n\n## Notes\n\nkeep me\n")
    with pytest.raises(ValueError, match="## Notes"):
        report_notes.write_report(path, "# New\n\n## Notes\n")
    assert path.read_text() == "# Old\n\n## Notes\n\nkeep me\n"


@pytest.mark.parametrize("name", ["floor_synthetic.md", "floor_elpv.md", "floor_synthetic_test100+120.md",
                                  "stfpm_epochs_curves.md"])
def test_the_hand_written_reports_keep_their_notes_under_the_heading(name):
    """These reports carry paragraphs written by hand; they must sit under '## Notes' to survive a rebuild."""
    text = (_FILE.parent / "results" / name).read_text()
    notes = report_notes.hand_notes(text)
    assert notes.startswith("## Notes") and "by hand" in notes.splitlines()[0]
