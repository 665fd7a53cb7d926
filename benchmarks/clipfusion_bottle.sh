#!/usr/bin/env bash
# CLIPFusion speed and memory at full size with random weights: ViT-L-14-336 + an SD-2.1-base-sized UNet and
# VAE at 512 px (--pretrained none --set diffusion=none: the real architectures and FLOPs, nothing downloaded).
# 16 bottle test images (a fixed stratified subset, --max-images 16), 0-shot and 1-shot. The per-component
# time breakdown (clip, vae, unet, text_encoder, memory_search, post_processing) is in each results.json
# under stage_seconds_per_image. Accuracy figures mean nothing with random weights.
set -euo pipefail
SHARED=${ANOMALENS_SHARED:-../shared}
COMMON=(--method clipfusion --pretrained none --set diffusion=none --dataset mvtec --root "$SHARED/datasets/mvtec"
        --category bottle --seeds 0 --max-images 16)
anomalens benchmark --overwrite "${COMMON[@]}" --shots 0 --out benchmarks/results/clipfusion-random-bottle-0shot
anomalens benchmark --overwrite "${COMMON[@]}" --shots 1 --out benchmarks/results/clipfusion-random-bottle-1shot
