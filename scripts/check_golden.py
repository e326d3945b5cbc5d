"""Run every golden case of the released code against this implementation.

usage: python scripts/check_golden.py [GOLDEN_DIR] [--dtype float32|bfloat16] [--atol 1e-4]

Prints one line per case with its largest absolute error and exits 1 on any failure, including
a case listed in cases.json that this script does not know how to run.
"""

import sys

from pipeline.cli import check_golden

if __name__ == "__main__":
    sys.exit(check_golden(sys.argv[1:]))
