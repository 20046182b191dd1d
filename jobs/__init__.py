"""Entry points users run (python -m jobs.<name>): index, reindex, search, benchmark, download.
Each parses arguments, turns expected failures into one line, and calls actors / service."""
