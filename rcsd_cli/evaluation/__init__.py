"""Grading: answer extraction, rubric scoring and judges, log-likelihood multiple choice, benchmarks, intervals."""
