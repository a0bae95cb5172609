"""Tools on top of the API: the quality-and-speed runs (``bench``) and the demo (``demo``), used by the
``qc`` command and ``benchmarks/``."""
