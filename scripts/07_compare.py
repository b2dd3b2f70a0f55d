#!/usr/bin/env python
"""Stage: `ptl compare` (every evaluated model in one table and figure). Same options; run with --help."""

from pyimagesearch_tl.cli import run_script

if __name__ == "__main__":
    run_script("compare")
