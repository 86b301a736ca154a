"""Create (or migrate) the MLflow store once, before parallel runs start (notes: 8 processes that
open a brand-new SQLite store at once race on its schema; once it exists, many writers are fine).

    python workflow/scripts/mlflow_store.py --uri sqlite:///abs/results/smoke/mlflow.db
"""

import argparse
import sys

from hcformer.errors import HCFormerError
from hcformer.tracking import ensure_store


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", required=True, help="an MLflow tracking URI")
    args = parser.parse_args()
    try:
        ensure_store(args.uri)
    except HCFormerError as exc:
        print(f"mlflow_store: error: {exc}", file=sys.stderr)
        return 2
    print(f"mlflow store ready: {args.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
