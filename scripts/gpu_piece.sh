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
# While it runs, $OUT/piece-N-progress.json (scripts/piece_progress.py) says every 15 s how far each run has got: the
# steps, tokens and seconds of training, the evaluations done; the archive holds its last state as progress.json.
# PIECE_DEADLINE_S=T stops the piece after T seconds (set it under the device's limit: a piece stopped there still
# sends back its progress, the speed the pieces' sizes need) and exits 3; so does a run that fails.
#
# PIECE_SCALE=S (an integer): a rehearsal, for a machine without a GPU. Every token count of the config (budgets, the
# global batch, BTX's branches) is divided by S, so each run takes the same steps, evaluations and corpus as the real
# piece with S times fewer tokens per step: it proves the piece runs end to end and measures what it sends back, but
# its losses mean nothing. It runs into piece-N-scale-S and packs piece-N-scale-S.tar.gz, which --merge refuses to
# mix with real pieces (another config).
#
# Data: the prepared corpus in runs/corpus-prepared; else the packed corpus that travels with the checkout
# (runs/corpus-packed, made here by `python scripts/corpus_pack.py pack runs/corpus-prepared runs/corpus-packed` and
# named in the device run's carry), unpacked and checked first; else the corpus's text (runs/corpus), prepared first.
# Python: $PYTHON, else python3.
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

setup_s=$(date +%s)
if grep -q 'runs/corpus-prepared' "$config"; then
  PYTHONPATH=src "$PYTHON" scripts/corpus_pack.py ensure runs/corpus-prepared
fi
setup=$(( $(date +%s) - setup_s ))

name=piece-$number
if [[ -n "${PIECE_SCALE:-}" ]]; then
  if [[ ! "$PIECE_SCALE" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_piece.sh: PIECE_SCALE must be a positive integer, not '$PIECE_SCALE'" >&2
    exit 2
  fi
  name=piece-$number-scale-$PIECE_SCALE
  mkdir -p "${PIECES_DIR:-runs/pieces}"
  scaled=${PIECES_DIR:-runs/pieces}/$name.yaml
  PYTHONPATH=src "$PYTHON" - "$config" "$scaled" "$PIECE_SCALE" <<'PY'
import sys
import yaml
source, target, scale = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = yaml.safe_load(open(source))
def divided(tokens, what):
    if tokens % scale:
        sys.exit(f"gpu_piece.sh: {what} ({tokens}) is not divisible by PIECE_SCALE={scale}")
    return tokens // scale
train = config["recipe"]["train"]
train["global_batch_tokens"] = divided(train["global_batch_tokens"], "recipe.train.global_batch_tokens")
sequences = train["global_batch_tokens"] // config["data"]["seq_len"]
if sequences < 1:
    sys.exit(f"gpu_piece.sh: PIECE_SCALE={scale} leaves less than one sequence per step")
train["micro_batch_size"] = min(train.get("micro_batch_size") or sequences, sequences)
config["budgets"] = [divided(b, "a budget") for b in config["budgets"]]
for arm in config["arms"]:
    if "branch_tokens" in arm:
        arm["branch_tokens"] = divided(arm["branch_tokens"], f"{arm['name']}'s branch_tokens")
with open(target, "w") as f:
    f.write(f"# {source} with every token count divided by {scale} (gpu_piece.sh PIECE_SCALE): a rehearsal\n")
    yaml.safe_dump(config, f, sort_keys=False)
PY
  config=$scaled
fi

out=${PIECES_DIR:-runs/pieces}/$name
mkdir -p "$out"
dest=${OUT:-${PIECES_DIR:-runs/pieces}}
mkdir -p "$dest"
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
start_s=$(date +%s)
deadline=${PIECE_DEADLINE_S:-0}
PYTHONPATH=src "$PYTHON" -m upcycle experiment --config "$config" --out "$out" --only "${arm_list[@]}" \
  --seeds "${seed_list[@]}" --parallel "$runs" &
experiment=$!
stopped=0
progress() {
  PYTHONPATH=src "$PYTHON" scripts/piece_progress.py "$out" --elapsed $(( $(date +%s) - start_s )) \
    --out "$dest/$name-progress.json" || true
}
last=-15
while kill -0 "$experiment" 2>/dev/null; do
  now=$(( $(date +%s) - start_s ))
  if (( now - last >= 15 )); then
    progress
    last=$now
  fi
  if (( deadline > 0 && now >= deadline )); then
    echo "gpu_piece.sh: $name stopped at PIECE_DEADLINE_S=$deadline s" >&2
    kill "$experiment" 2>/dev/null || true
    stopped=1
    break
  fi
  sleep 1
done
status=0
wait "$experiment" || status=$?
wall=$(( $(date +%s) - start_s ))
progress
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
if (( stopped || status != 0 )); then
  echo "gpu_piece.sh: $name did not finish (exit $status) after ${wall} s on ${gpu:-unknown}; its progress:" \
    "$dest/$name-progress.json" >&2
  exit 3
fi
PIECE_NUMBER=$number PIECE_CONFIG=$config PIECE_ARMS=$arms PIECE_SEEDS=$seeds PIECE_STARTED=$started \
PIECE_WALL=$wall PIECE_SETUP=$setup PIECE_SCALE=${PIECE_SCALE:-1} PIECE_GPU=${gpu:-unknown} PIECE_ROOT=$(pwd) \
PIECE_OUT=$out "$PYTHON" - <<'PY'
import json, os
keys = {"number": int, "config": str, "arms": str.split, "seeds": lambda s: [int(v) for v in s.split()],
        "started": str, "wall": int, "setup": int, "scale": int, "gpu": str, "root": str}
record = {k: convert(os.environ[f"PIECE_{k.upper()}"]) for k, convert in keys.items()}
record["wall_seconds"] = record.pop("wall")
record["setup_seconds"] = record.pop("setup")  # the corpus made ready (present, unpacked or prepared)
with open(os.path.join(os.environ["PIECE_OUT"], "piece.json"), "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
PY
cp "$dest/$name-progress.json" "$out/progress.json"
( cd "$out" && tar -czf - experiment.yaml validation.json piece.json progress.json arms/*/seed_*/arm.json ) \
  >"$dest/$name.tar.gz"
echo "gpu_piece.sh: $name ($arms; seeds $seeds) took ${setup} s to ready the corpus and ${wall} s to run on" \
  "${gpu:-unknown}; wrote $dest/$name.tar.gz ($(wc -c <"$dest/$name.tar.gz") bytes)"
