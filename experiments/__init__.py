"""Benchmark and figure scripts outside the installed packages (``python -m experiments.<name>``).
They read the index config (``configs/*.yaml`` or ``--config``) and measure the pipeline's own code."""
