"""Marks and their evidence: keys, exact statistics, white-box extraction, black-box verdicts."""
