#!/usr/bin/env bash
# Best-of-N responses -> density-ratio rewards -> DPO pairs that `datasets` loads.
#
#   bash examples/best_of_n.sh [OUT_DIR]
#
# 1. annotate: score every response of examples/responses.jsonl with the default pair
# 2. pairs:    the CDR recipe (chosen = highest reward, rejected = a seeded random other)
#              and REAL's dissimilar pair (embeddings of the strong model)
# 3. load:     datasets.load_dataset("json", ...) -- what TRL's DPOTrainer takes
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-best-of-n-out}
mkdir -p "$out"
cdr annotate "$here/responses.jsonl" -o "$out/scored.jsonl" --overwrite --quiet
cdr pairs "$out/scored.jsonl" -o "$out/dpo-cdr.jsonl" --strategy best-random --overwrite --quiet
cdr pairs "$out/scored.jsonl" -o "$out/dpo-real.jsonl" --strategy real-easy --overwrite --quiet
python - "$out" <<'PY'
import sys
try:
    import datasets
except ImportError:
    sys.exit("pip install datasets to load the result")
for name in ("dpo-cdr", "dpo-real"):
    ds = datasets.load_dataset("json", data_files=f"{sys.argv[1]}/{name}.jsonl", split="train")
    print(name, ds.num_rows, "rows, columns:", ", ".join(ds.column_names))
PY
