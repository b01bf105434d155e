"""Reports on cost tables: the summary `show` prints, `plot`, and `compare` for CI regressions."""

# compare's defaults, here so the command line shows them without importing pandas and scipy
DEFAULT_THRESHOLD = 0.10  # a row must slow down by more than this...
DEFAULT_ALPHA = 0.002  # ...at this per-row significance (asv's); over ~2,000 rows 0.05 flags dozens by chance
