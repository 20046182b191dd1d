"""Algorithms and their typed parameters: plain functions and small classes over numpy / torch arrays.
No Ray, no I/O, no imports of the other packages; one frozen dataclass of parameters next to each method."""
