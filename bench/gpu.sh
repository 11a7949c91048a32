#!/usr/bin/env bash
# The GPU figures of issue 14: s/iter, images/s and peak memory of the R50 presets at batch 2, 800x1216, bf16
# autocast (train.amp, on by default on CUDA), for each deformable attention implementation; then the same step
# against HF transformers' DeformableDetr. Run on a CUDA machine from the repository root:
#
#     bash bench/gpu.sh [OUT_DIR]        # default runs/bench-gpu; each block also prints its table
#
# Every measurement is its own subprocess (bench_detector.py), so each peak (torch.cuda.max_memory_allocated) is
# its own. Needs: pip install -e ".[bench]" (transformers for the HF peer).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/bench-gpu}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'bench/gpu.sh needs a CUDA GPU'; print(torch.cuda.get_device_name())" \
    | tee "$out/device.txt"

run() {  # name, then bench_detector.py arguments
    local name="$1"; shift
    echo "== $name"
    python bench/bench_detector.py --device cuda --batch 2 --size 800x1216 --iters 10 --warmup 3 "$@" | tee "$out/$name.txt"
}

for impl in grid_sample sparse; do
    run "deformable_detr_pp_r50_1x-$impl" --preset deformable_detr_pp_r50_1x --set model.transformer.attention_impl=$impl
    run "co_deformable_detr_k2_r50_1x-$impl" --preset co_deformable_detr_k2_r50_1x --set model.transformer.attention_impl=$impl
    run "co_dino_5scale_r50_1x-$impl" --preset co_dino_5scale_r50_1x --set model.transformer.attention_impl=$impl
done
run "deformable_detr_pp_r50_1x-checkpointing" --preset deformable_detr_pp_r50_1x --set train.activation_checkpointing=true
run "deformable_detr_pp_r50_1x-vs-hf" --preset deformable_detr_pp_r50_1x --hf
echo "tables in $out/"
