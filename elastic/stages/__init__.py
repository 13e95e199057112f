"""One module per pipeline stage, each exposing `run(cfg, run: RunDir) -> dict` (a short summary)."""

# The order `stage=all` runs them in; a stage whose module is missing is skipped as "not implemented yet".
ORDER = ("importance", "search", "prune", "distill", "quantize", "export", "evaluate")

# Tools run on their own (`stage=<name>`), never by `stage=all`: no DONE marker, always recomputed.
STANDALONE = ("plan",)
