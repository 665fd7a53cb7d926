#!/usr/bin/env bash
# VLMDiff trained from scratch on this machine: MVTec AD bottle train/good (209 images), the "small" UNet and
# guidance network, TAEF2 latents (real weights), MiniLM-encoded template captions (real weights, offline).
# Then the benchmark on bottle's test split with the paper's inference (t = 999, 10 DDIM steps) and TAEF2
# features for the difference map, ablations of the noise level and the feature extractor, and PNG grids.
# Run from the repository root; ANOMALENS_SHARED points at the shared data (default ../shared).
set -euo pipefail
SHARED=${ANOMALENS_SHARED:-../shared}
RUN=${VLMDIFF_RUN:-runs/vlmdiff-bottle-small}
RESULTS=benchmarks/results/vlmdiff-small-taef2-minilm-bottle
export ANOMALENS_WEIGHTS_DIR="$SHARED/weights/taef2"

# Training (about an hour on 2 cores); re-running resumes from the run's checkpoint.
anomalens train vlmdiff --dataset mvtec --root "$SHARED/datasets/mvtec" --categories bottle --out "$RUN" \
    --unet small --autoencoder taef2 --text-encoder minilm --image-size 256 --steps 2200 --batch-size 12 \
    --lr 2e-4 --warmup-steps 100 --checkpoint-every 100 --seed 0

mkdir -p "$RESULTS"
cp "$RUN/losses.csv" "$RUN/loss.png" "$RUN/vlmdiff.json" "$RESULTS/"

bench() {  # name, then --set options
    local name=$1; shift
    anomalens benchmark --overwrite --method vlmdiff --set checkpoint="$RUN" "$@" \
        --dataset mvtec --root "$SHARED/datasets/mvtec" --category bottle --shots 0 --out "$RESULTS/$name"
}
bench t999-taef2 --set feature_extractor=taef2
bench t500-taef2 --set feature_extractor=taef2 --set noise_level=500
bench t250-taef2 --set feature_extractor=taef2 --set noise_level=250
CRAFT=$(python3 -c "import easyocr_en_models, pathlib; print(pathlib.Path(easyocr_en_models.__file__).parent / 'models' / 'craft_mlt_25k.pth')")
bench t999-vgg16bn --set feature_extractor=vgg16_bn --set feature_weights="$CRAFT"

for level in 999 500; do
    python3 benchmarks/vlmdiff_grid.py --run "$RUN" --set feature_extractor=taef2 --set noise_level=$level \
        --root "$SHARED/datasets/mvtec/bottle/test" --out "$RESULTS/grid-t$level.png"
done
