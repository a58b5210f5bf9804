#!/usr/bin/env bash
# The main job end to end: installs, generates a sample photo collection with known near-duplicates,
# indexes it, queries it with transformed copies, prints the ranked results and writes an HTML page.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
out="${DEMO_DIR:-out/demo}"
[ -d "$out/photos" ] || python -m engine.sample --output="$out"
python -m engine.index --images="$out/photos" --index="$out/index" --statistics=center "$@"
python -m engine.query --index="$out/index" --query="$out/queries" --k=5 --html="$out/results.html"
python -m engine.dedup --index="$out/index" --html="$out/duplicates.html" | tail -n 1
echo "results page: $out/results.html"
