"""Reports on cost tables: the summary `show` prints, `plot`, and `compare` for CI regressions."""
