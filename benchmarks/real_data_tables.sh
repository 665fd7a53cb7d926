#!/usr/bin/env bash
# Issue 21's tables on every MVTec-layout category of the shared data (MVTec AD bottle, MPDD metal_plate):
# PatchCore-TAEF2 at 1 and 4 shots (seeds 0 1 2) with and without tiling, full shot, the conformal threshold's
# measured false-alarm rate, the VLMDiff multi-class model, and an ensemble of the two. Two lanes (one per
# category) run side by side with one thread each. Run from the repository root; ANOMALENS_SHARED points at the
# shared data (default ../shared); VLMDIFF_RUN at the multi-class VLMDiff run (benchmarks/vlmdiff_multiclass.sh).
set -euo pipefail
SHARED=${ANOMALENS_SHARED:-../shared}
export ANOMALENS_WEIGHTS_DIR="$SHARED/weights/taef2" OMP_NUM_THREADS=1
RESULTS=benchmarks/results/real-data
VLMDIFF_RUN=${VLMDIFF_RUN:-runs/vlmdiff-multiclass-small-paper}
VLMDIFF=(--set "checkpoint=$VLMDIFF_RUN" --set feature_extractor=taef2 --set noise_level=500)
ENSEMBLE_MEMBERS="[{\"method\": \"patchcore\", \"backbone\": \"taef2\"}, {\"method\": \"vlmdiff\", \"checkpoint\": \"$VLMDIFF_RUN\", \"feature_extractor\": \"taef2\", \"noise_level\": 500}]"
mkdir -p "$RESULTS" runs/logs

lane() {  # dataset root, category, tile size (4 tiles of at least 25% overlap on these square images)
    local root=$1 category=$2 tile=$3
    local bench=(anomalens -q benchmark --overwrite --dataset mvtec --root "$root" --category "$category")
    local patchcore=(--method patchcore --backbone taef2)
    for shots in 1 4; do
        "${bench[@]}" "${patchcore[@]}" --shots $shots --seeds 0 1 2 --out "$RESULTS/patchcore-$category-${shots}shot"
        "${bench[@]}" "${patchcore[@]}" --shots $shots --seeds 0 1 2 --set "tiling=size=$tile,overlap=0.25" \
            --out "$RESULTS/patchcore-tiled-$category-${shots}shot"
    done
    # full shot with the conformal threshold: a seeded split holds references out, the detector keeps the rest
    "${bench[@]}" "${patchcore[@]}" --shots all --false-alarm-rates 0.01 0.05 0.1 --calibration split \
        --out "$RESULTS/patchcore-$category-fullshot-split"
    "${bench[@]}" --method vlmdiff "${VLMDIFF[@]}" --shots 0 --out "$RESULTS/vlmdiff-multiclass-$category"
    "${bench[@]}" --method ensemble --set "members=$ENSEMBLE_MEMBERS" --shots 4 --seeds 0 1 2 \
        --out "$RESULTS/ensemble-$category-4shot"
}
lane "$SHARED/datasets/mvtec" bottle 600 > runs/logs/tables-bottle.log 2>&1 &
lane "$SHARED/datasets/mpdd" metal_plate 352 > runs/logs/tables-metal_plate.log 2>&1 &
wait
python3 benchmarks/real_data_summary.py --results "$RESULTS"
