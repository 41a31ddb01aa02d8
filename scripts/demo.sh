#!/usr/bin/env bash
# The README's main job, through the stock Ptychodus batch mode:
#   simulate a scan (Ptychodus's own simulator and writers) -> `ptychodus -b train` on the CPU
#   -> `ptychodus -b reconstruct` with the trained model -> object image (PNG) and arrays.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]   (default demo_output/; rerunning replaces it)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/ensure_env.sh"
source "$ROOT/scripts/venv_path.sh"
OUT=$("$VENV/bin/python" -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' \
  "${1:-$ROOT/demo_output}")
# the ready-made file as installed with the package (ensure_env.sh reinstalls it after an
# edit of resources/settings/); a torchpinn-demo.ini in OUTPUT_DIR would be used instead
SETTINGS=torchpinn-demo.ini
# A rerun replaces the demo's own folders, and only those: each folder the demo makes holds its
# marker, written before anything else goes in (so a run cut short is recognised too); in/
# written by an earlier version holds ground_truth.npz (which only vouches for in/ itself:
# `host.demo simulate` writes it too, beside a train/ of the user's own). Folders of those
# names from anything else are never deleted.
MARK=.torchpinn-demo
for sub in in train reconstruct; do
  ours=no
  if [ -f "$OUT/$sub/$MARK" ] || { [ "$sub" = in ] && [ -f "$OUT/in/ground_truth.npz" ]; }; then
    ours=yes
  fi
  if [ -e "$OUT/$sub" ] && [ "$ours" = no ]; then
    echo "[demo] error: $OUT already holds $sub/, which holds no mark of this demo (another" \
      "program's folder, or an older demo's: delete it if so); or give the demo another" \
      "folder: bash scripts/demo.sh DIR" >&2
    exit 1
  fi
done
rm -rf "$OUT/in" "$OUT/train" "$OUT/reconstruct"
for sub in in train reconstruct; do
  mkdir -p "$OUT/$sub"
  touch "$OUT/$sub/$MARK"
done
# Run from the output folder so Python imports the installed package, never the checkout.
cd "$OUT"
PY="$VENV/bin/python"

echo "[demo] 1/4 simulating a scan into $OUT/in"
"$PY" -m ptychodus_torch_plugin.host.demo simulate in --N 32 --scan-points 20 \
  --settings "$SETTINGS"
echo "[demo] 2/4 training: ptychodus -b train -i in -o train"
"$VENV/bin/ptychodus" -b train -i in -o train
cp train/wts.h5.zip in/model.h5.zip
echo "[demo] 3/4 reconstructing: ptychodus -b reconstruct -i in -o reconstruct"
"$VENV/bin/ptychodus" -b reconstruct -i in -o reconstruct
echo "[demo] 4/4 scoring against the simulated ground truth and writing images"
"$PY" -m ptychodus_torch_plugin.host.demo score reconstruct in --images "$OUT"
echo "[demo] done: $OUT/object_amplitude.png, $OUT/object_phase.png, model archive train/wts.h5.zip"
