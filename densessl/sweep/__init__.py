"""``densessl sweep``: grids of pretrain → fine-tune cells and their report.

* :mod:`~densessl.sweep.runner` — reads a sweep file, expands its grid into cells (each a
  checked recipe), runs them (resumable, ``jobs`` in parallel) and keeps ``results.csv``.
* :mod:`~densessl.sweep.report` — the results table, its mean ± std summary over seeds
  (``summary.csv`` / ``summary.md``) and the plots.
"""

from densessl.sweep.report import read_results, summarize, write_summary
from densessl.sweep.runner import cell_id, cell_recipe, expand_grid, load_sweep, plan, run_sweep

__all__ = ["cell_id", "cell_recipe", "expand_grid", "load_sweep", "plan", "read_results",
           "run_sweep", "summarize", "write_summary"]
