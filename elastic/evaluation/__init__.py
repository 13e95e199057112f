"""The evaluate stage's parts: which models a run holds (models), held-out loss (quality), lm-eval
multiple choice (lmeval), pass-key retrieval (passkey), sizes / speed / memory (cost), and the
report with its plots (report)."""
