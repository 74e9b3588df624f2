"""Prompts (student, teacher, analysis, rubric designer, judge), rubric generation and rubric ablations."""
