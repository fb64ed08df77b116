#!/usr/bin/env bash
# Rebuild the phantom demo model shipped at text2ct_engine/assets/phantom_model, end to end, on the CPU:
# phantoms -> tokenizer -> VAE -> CLIP -> model dir -> latent cache -> LDM -> install -> evaluation.
#
#     bash benchmarks/train_phantom_model.sh            # RUN=runs/phantom_model (must not exist yet)
#
# Every stage uses the project's own CLIs with the exact settings of the shipped model; seeds are fixed and
# OMP_NUM_THREADS=1 (float reductions depend on the thread count), so a rerun with the same torch on the same
# kind of CPU gives the same weights: rerun 2026-12-01, the phantoms, tokenizer, VAE and CLIP came out
# bit-identical; the CLIP (then given --label-weight 16) shipped was retrained that day from the rerun's
# tokenizer and VAE, the UNet on 2026-12-02 (zero init, EMA warm-up) by stages 1, 5-7 and 9 on the shipped VAE
# and text tower, with these flags (not run twice at full size: see benchmarks/RESULTS.md).
# Wall time of each stage goes to $RUN/times.txt.
# Measured 2026-11-25 on the 2-core CI machine (AMD EPYC, torch 2.13.0+cpu) while other jobs shared it (see
# benchmarks/RESULTS.md, "Phantom demo model"): phantoms 5.2 min, tokenizer 6 s, VAE 22 min and CLIP 15.5 min
# (side by side), cache 2.9 min, assemble 6 s, LDM 31.5 min, evaluation 5 min: about 65 min of wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/phantom_model}
ASSET=${ASSET:-text2ct_engine/assets/phantom_model}
CFG=benchmarks/phantom_model
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # on a busy 2-core machine 1 thread ran faster than 2
SIZE=(64 64 32)          # voxels x, y, z: the whole 384 mm phantom field of view ...
SPACING=(6 6 12)         # ... at 6 x 6 x 12 mm
if [ -e "$RUN" ]; then echo "error: $RUN exists: remove it or set RUN=another/folder" >&2; exit 2; fi
mkdir -p "$RUN"
stage() {  # stage NAME COMMAND...: run it, log its output, record its wall time
    local name=$1; shift
    local t0; t0=$(date +%s)
    echo "== $name: $*"
    "$@" 2>&1 | tee "$RUN/$name.log"
    echo "$name $(( $(date +%s) - t0 )) s" | tee -a "$RUN/times.txt"
}

# 1. data: 400 training studies (seed 0) and 48 held-out ones (valid split, seed 1)
stage phantoms_train $PY -m text2ct_engine.data.phantom --n 400 --size "${SIZE[@]}" --out "$RUN/phantom" \
    --seed 0 --workers 2 --quiet
stage phantoms_valid $PY -m text2ct_engine.data.phantom --n 48 --size "${SIZE[@]}" --out "$RUN/phantom" \
    --seed 1 --split valid --workers 2 --quiet --force

# 2. BPE tokenizer on the training reports (941 tokens; the longest report is 199 tokens)
stage tokenizer $PY -m text2ct_engine.tokenizer train \
    --corpus "$RUN/phantom/dataset/radiology_text_reports/train_reports.csv" --vocab-size 1024 \
    --context-length 256 --out "$RUN/tokenizer.json"

# 3. VAE (0.74 M parameters) and 4. CLIP (0.99 M) side by side: they do not depend on each other. The CLIP
#    also reads the findings out of both embeddings (--label-weight 16): trained by the contrastive loss alone,
#    its text embedding carried no finding (held-out linear probe at the majority answer), so the UNet had
#    nothing to follow (benchmarks/RESULTS.md, "Phantom demo model")
stage vae $PY -m text2ct_engine.train vae --data "$RUN/phantom" --out "$RUN/vae" --size "${SIZE[@]}" \
    --spacing "${SPACING[@]}" --patch-size "${SIZE[@]}" --channels 16 32 64 --res-blocks 1 --norm-groups 16 \
    --batch-size 1 --steps 240 --lr 5e-4 --warmup-steps 30 --log-every 20 --eval-every 240 --save-every 240 \
    --val 8 --no-gradient-checkpointing --seed 0 &
VAE_PID=$!
stage clip $PY -m text2ct_engine.train clip --data "$RUN/phantom" --tokenizer "$RUN/tokenizer.json" \
    --out "$RUN/clip" --config $CFG/clip.json --size "${SIZE[@]}" --steps 800 --batch-size 16 --lr 1e-3 \
    --warmup-steps 40 --log-every 20 --eval-every 200 --save-every 200 --no-gradient-checkpointing --seed 0 \
    --label-weight 16
wait $VAE_PID

# 5. latent cache of the training split (latents 4 x 16 x 16 x 8)
stage cache $PY -m text2ct_engine.data.cache --data "$RUN/phantom" --vae "$RUN/vae/model" --out "$RUN/cache" \
    --size "${SIZE[@]}" --spacing "${SPACING[@]}" --device cpu --dtype float32

# 6. starting model directory: trained VAE + CLIP text tower + a fresh (seeded) UNet, 128-wide cross-attention
stage assemble $PY -m text2ct_engine.assemble --vae "$RUN/vae/model" --clip "$RUN/clip/model" \
    --unet-config $CFG/unet.json --out "$RUN/init" --size "${SIZE[@]}" --spacing "${SPACING[@]}" \
    --steps 30 --guidance 5 --seed 0

# 7. diffusion UNet (1.66 M parameters) from its seeded initialisation in init/ (not --from-scratch, whose
#    re-initialisation is not seeded), scale factor 1/std of the cached latents
stage ldm $PY -m text2ct_engine.train ldm --model "$RUN/init" --data "$RUN/cache" --out "$RUN/ldm" \
    --scale-factor auto --steps 4000 --batch-size 4 --lr 5e-4 --warmup-steps 50 --ema-decay 0.995 \
    --log-every 20 --save-every 200 --no-gradient-checkpointing --seed 0 --device cpu

# 8. install: the trained model directory becomes the package's default model
rm -rf "$ASSET" && mkdir -p "$(dirname "$ASSET")" && cp -r "$RUN/ldm/model" "$ASSET" && chmod -R a+rX "$ASSET"
echo "installed $ASSET ($(du -sh "$ASSET" | cut -f1))"

# 9. evaluation: findings detector on real held-out phantoms at this size vs volumes generated from their reports
stage evaluate $PY $CFG/evaluate.py --model "$ASSET" --data "$RUN/phantom" --n-real 48 --n-gen 24 \
    --out "$RUN/eval.json"
#    ... and what the text conditioning carries: a linear probe of the findings on held-out reports
stage probe $PY $CFG/probe_text.py --model "$ASSET" --data "$RUN/phantom" --json "$RUN/probe.json"
cat "$RUN/times.txt"
