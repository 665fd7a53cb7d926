#!/usr/bin/env bash
# Speed and memory of the CLIP methods at full size with random weights (--pretrained none: no download,
# the real architecture and FLOPs), on MVTec AD bottle. Their accuracy figures mean nothing; the timings do.
# Run from the repository root; ANOMALENS_SHARED points at the shared data (default ../shared).
set -euo pipefail
SHARED=${ANOMALENS_SHARED:-../shared}
COMMON=(--dataset mvtec --root "$SHARED/datasets/mvtec" --category bottle --seeds 0 --pretrained none)
anomalens benchmark --overwrite --method winclip --backbone ViT-B-16-plus-240 "${COMMON[@]}" --shots 0 \
    --out benchmarks/results/winclip-vitb16plus-random-bottle-0shot
anomalens benchmark --overwrite --method winclip --backbone ViT-B-16-plus-240 "${COMMON[@]}" --shots 1 \
    --out benchmarks/results/winclip-vitb16plus-random-bottle-1shot
anomalens benchmark --overwrite --method dual_image_clip --backbone ViT-L-14-336 "${COMMON[@]}" --shots 0 --set tta=true \
    --out benchmarks/results/dual-image-clip-vitl14-336-random-bottle-tta
anomalens benchmark --overwrite --method dual_image_clip --backbone ViT-L-14-336 "${COMMON[@]}" --shots 0 --set tta=false \
    --out benchmarks/results/dual-image-clip-vitl14-336-random-bottle-no-tta
