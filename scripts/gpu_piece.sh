#!/usr/bin/env bash
# Run piece N of the full study (experiments/replication.yaml, and its cosine control as piece 18) on one GPU machine,
# from a fresh checkout, and pack what it measured, without models or checkpoints, into one small archive.
#
#   scripts/gpu_piece.sh N            run piece N into runs/pieces/piece-N; pack to $OUT (or runs/pieces) piece-N.tar.gz
#   scripts/gpu_piece.sh --list       the pieces: number, config, arms, seeds
#
# A piece is a set of runs (arm, seed), at most 2 of the study's (6 for the cosine control's short runs), trained at
# once on the one GPU, each run with every budget of the study (its warmup-stable-decay run and every decay branch), so
# no piece ever needs another piece's checkpoints. The archive holds each run's arm.json (every measurement: losses,
# per-document losses, routing, specialization, training-split loss), experiment.yaml, validation.json and piece.json
# (where and when it ran, the GPU, the wall time): no weights. Unpack each into
# docs/experiments/replication/pieces/piece-N/ and, once every piece of a config has run,
#   upcycle experiment --merge docs/experiments/replication/pieces/piece-{1..17} --out docs/experiments/replication
# Ledger of which pieces ran, where and when: docs/experiments/replication/pieces.md.
#
# Data: the prepared corpus in runs/corpus-prepared (docs/experiments.md, "Reproduce"), or, when only the corpus's
# text is there (runs/corpus/*.{train,val}.jsonl.gz), it is prepared here first. Python: $PYTHON, else python3.
# PIECES_FILE: another table of pieces (lines NUMBER|CONFIG|ARMS|SEEDS; the test suite runs a tiny one on CPU);
# PIECES_DIR: where pieces run (default runs/pieces).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# number | config | arms (space-separated) | seeds (space-separated); primary arms first
PIECES=(
  "1|experiments/replication.yaml|naive|1 2"
  "2|experiments/replication.yaml|drop-0.5-shared|1 2"
  "3|experiments/replication.yaml|drop-0.5|1 2"
  "4|experiments/replication.yaml|naive|3 4"
  "5|experiments/replication.yaml|drop-0.5-shared|3 4"
  "6|experiments/replication.yaml|drop-0.5|3 4"
  "7|experiments/replication.yaml|naive drop-0.5-shared|5"
  "8|experiments/replication.yaml|drop-0.5|5"
  "9|experiments/replication.yaml|dense|1 2"
  "10|experiments/replication.yaml|fs|1 2"
  "11|experiments/replication.yaml|noise|1 2"
  "12|experiments/replication.yaml|drop-0.25|1 2"
  "13|experiments/replication.yaml|drop-0.75|1 2"
  "14|experiments/replication.yaml|btx|1 2"
  "15|experiments/replication.yaml|dense fs|3"
  "16|experiments/replication.yaml|noise drop-0.25|3"
  "17|experiments/replication.yaml|drop-0.75 btx|3"
  "18|experiments/replication-cosine.yaml|naive drop-0.5-shared|1 2 3"
)

if [[ -n "${PIECES_FILE:-}" ]]; then
  mapfile -t PIECES < <(grep -v '^\s*\(#\|$\)' "$PIECES_FILE")
fi
if [[ "${1:-}" == "--list" ]]; then
  printf '%s\n' "${PIECES[@]}"
  exit 0
fi
if [[ $# -ne 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: scripts/gpu_piece.sh N | --list" >&2
  exit 2
fi
entry=""
for piece in "${PIECES[@]}"; do
  [[ "${piece%%|*}" == "$1" ]] && entry=$piece
done
if [[ -z "$entry" ]]; then
  echo "gpu_piece.sh: no piece $1 (scripts/gpu_piece.sh --list)" >&2
  exit 2
fi
IFS='|' read -r number config arms seeds <<<"$entry"
read -r -a arm_list <<<"$arms"
read -r -a seed_list <<<"$seeds"
runs=$(( ${#arm_list[@]} * ${#seed_list[@]} ))

if grep -q 'runs/corpus-prepared' "$config" && [[ ! -f runs/corpus-prepared/data.json ]]; then
  if ! ls runs/corpus/*.train.jsonl.gz >/dev/null 2>&1; then
    echo "gpu_piece.sh: no runs/corpus-prepared and no runs/corpus/*.jsonl.gz to prepare it from" >&2
    exit 2
  fi
  domains=() val=()
  for name in english japanese code; do
    domains+=("$name=runs/corpus/$name.train.jsonl.gz")
    val+=("$name=runs/corpus/$name.val.jsonl.gz")
  done
  PYTHONPATH=src "$PYTHON" -m upcycle data prepare runs/corpus-prepared assets/tokenizer --domain "${domains[@]}" \
    --val-domain "${val[@]}"
fi

out=${PIECES_DIR:-runs/pieces}/piece-$number
mkdir -p "$out"
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
start_s=$(date +%s)
PYTHONPATH=src "$PYTHON" -m upcycle experiment --config "$config" --out "$out" --only "${arm_list[@]}" \
  --seeds "${seed_list[@]}" --parallel "$runs"
wall=$(( $(date +%s) - start_s ))
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
PIECE_NUMBER=$number PIECE_CONFIG=$config PIECE_ARMS=$arms PIECE_SEEDS=$seeds PIECE_STARTED=$started \
PIECE_WALL=$wall PIECE_GPU=${gpu:-unknown} PIECE_ROOT=$(pwd) PIECE_OUT=$out "$PYTHON" - <<'PY'
import json, os
keys = {"number": int, "config": str, "arms": str.split, "seeds": lambda s: [int(v) for v in s.split()],
        "started": str, "wall": int, "gpu": str, "root": str}
record = {k: convert(os.environ[f"PIECE_{k.upper()}"]) for k, convert in keys.items()}
record["wall_seconds"] = record.pop("wall")
with open(os.path.join(os.environ["PIECE_OUT"], "piece.json"), "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
PY
dest=${OUT:-${PIECES_DIR:-runs/pieces}}
mkdir -p "$dest"
( cd "$out" && tar -czf - experiment.yaml validation.json piece.json arms/*/seed_*/arm.json ) \
  >"$dest/piece-$number.tar.gz"
echo "gpu_piece.sh: piece $number ($arms; seeds $seeds) took ${wall} s on ${gpu:-unknown};" \
  "wrote $dest/piece-$number.tar.gz"
