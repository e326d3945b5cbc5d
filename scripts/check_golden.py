"""Run every golden case of the released code against this implementation.

usage: python scripts/check_golden.py [GOLDEN_DIR] [--atol 1e-4]

Prints one line per case with its largest absolute error and exits 1 on any failure, including
a case listed in cases.json that this script does not know how to run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.golden import GoldenMismatch, load_cases, runners  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("golden_dir", nargs="?", default=str(ROOT.parent / "shared" / "golden"))
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed absolute error")
    args = parser.parse_args(argv)
    golden = Path(args.golden_dir)
    if not (golden / "cases.json").is_file():
        print(f"error: {golden / 'cases.json'} not found; pass the golden folder as the first argument",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    table = runners()
    failed = 0
    for name in load_cases(golden):
        if name not in table:
            print(f"FAIL {name:28s} no runner for this case")
            failed += 1
            continue
        try:
            errors = table[name](golden)
        except GoldenMismatch as err:
            print(f"FAIL {name:28s} {err}")
            failed += 1
            continue
        worst = max(errors.values())
        ok = worst <= args.atol
        failed += not ok
        detail = "  ".join(f"{k}={v:.2e}" for k, v in errors.items())
        print(f"{'ok  ' if ok else 'FAIL'} {name:28s} max_abs_err={worst:.2e}  ({detail})")
    print(f"{len(load_cases(golden)) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
