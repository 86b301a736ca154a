#!/usr/bin/env bash
# Stop the daemons that .ci/slurm-up.sh started (by the pids it recorded).
set -uo pipefail
DIR=${SLURM_CI_DIR:-/tmp/hcformer-slurm}
[ -f "$DIR/pids" ] || exit 0
scancel --user="$(id -un)" 2> /dev/null || true
while read -r pid; do
    [ -n "$pid" ] && kill "$pid" 2> /dev/null || true
done < "$DIR/pids"
rm -f "$DIR/pids"
echo "slurm-down: stopped"
