#!/usr/bin/env python
"""Write the atlasflow demo CT DICOM series: ``make_demo_series.py OUT_DIR [--nifti P] [--seed S]``.

Thin wrapper around `atlasflow.cli.demo_series.write_demo_series` (see its docstring).
"""

from __future__ import annotations

import sys

from atlasflow.cli.demo_series import main

if __name__ == "__main__":
    sys.exit(main())
