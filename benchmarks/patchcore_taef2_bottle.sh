#!/usr/bin/env bash
# PatchCore on the TAEF2 backbone (real weights), MVTec AD bottle: 1-shot (3 seeds) and full train/good.
# Run from the repository root; ANOMALENS_SHARED points at the shared data (default ../shared).
set -euo pipefail
SHARED=${ANOMALENS_SHARED:-../shared}
anomalens benchmark --overwrite --method patchcore --backbone taef2 --weights-dir "$SHARED/weights/taef2" \
    --dataset mvtec --root "$SHARED/datasets/mvtec" --category bottle --shots 1 --seeds 0 1 2 \
    --out benchmarks/results/patchcore-taef2-bottle-1shot
anomalens benchmark --overwrite --method patchcore --backbone taef2 --weights-dir "$SHARED/weights/taef2" \
    --dataset mvtec --root "$SHARED/datasets/mvtec" --category bottle --shots all --seeds 0 \
    --out benchmarks/results/patchcore-taef2-bottle-fullshot
# The paper-default scoring one detail at a time back to the former (issue 20), 1-shot, the same seeds
for setting in image_score=max neighbourhood_padding=exclude smoothing_border=nearest; do
    anomalens benchmark --overwrite --method patchcore --backbone taef2 --weights-dir "$SHARED/weights/taef2" \
        --set "$setting" --dataset mvtec --root "$SHARED/datasets/mvtec" --category bottle --shots 1 --seeds 0 1 2 \
        --out "benchmarks/results/patchcore-taef2-bottle-1shot-ablations/${setting/=/-}"
done
