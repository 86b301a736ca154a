#!/usr/bin/env bash
# Snakemake runs this in the new environment from the workflow's working directory, the project
# root: install the project (its dependencies pinned in pyproject.toml), editable, so that every
# rule runs the checkout's code.
set -euo pipefail
if ! grep -q '^name = "hcformer"$' pyproject.toml 2>/dev/null; then
    echo "hcformer.post-deploy.sh: run Snakemake from the hcformer project root (no pyproject.toml of hcformer in $PWD)" >&2
    exit 1
fi
python -m pip install --no-input -e .
