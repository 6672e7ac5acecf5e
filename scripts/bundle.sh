#!/usr/bin/env bash
# The bundled model (mimood/assets/model/): `make bundle`, about 2 hours on 2 CPU cores, resumable (run it again).
# Training data, all of it redistributable as a trained model (see mimood/assets/model/MODEL_CARD.md):
#   - 54 synthetic healthy T2 volumes from SynthSeg label maps 1-18 (Apache-2.0), seed 0;
#   - the tumour-free parts of four expert-labelled BraTS 2018 T2 cases (TCIA01_425_1, TCIA02_606_1, TCIA13_623_1
#     from ../shared/data/real/lesion, 2013_2_1 from lesion_more): slices >= 1 mm from the tumour and mirrored
#     tumour-free hemispheres (preset `real`). The other four expert-labelled cases (2013_20_1, CBICA_AME_1,
#     TCIA10_628_1, 2013_27_1) are never seen: they measure the model (benchmarks/crossfit.py, this run is fold A);
#   - batches drawn 0.2 synthetic : 0.8 BraTS (--source-weights 0.2,0.8);
#   - 20 synthetic volumes from label maps 19-20 (seed 2) are the scan score's healthy reference only.
# Usage: SHARED=../shared/data WORK=bundle_work scripts/bundle.sh [stage ...]
#        stages: data train calibrate export (default: all four, in order)
set -euo pipefail
shared=${SHARED:-../shared/data}
work=${WORK:-bundle_work}
py=${PY:-.venv/bin/python}
out=${OUT:-mimood/assets/model}
run=$work/run
stages=${*:-data train calibrate export}
export PYTHONUNBUFFERED=1
for stage in $stages; do
  case $stage in
  data)
    mkdir -p "$work"
    [ -f "$work/synth_train/synth.json" ] || $py -m mimood.cli.data synth --labelmaps "$shared/synth/labelmaps" \
        --n 54 --select 0:18 --seed 0 --out "$work/synth_train"
    [ -f "$work/synth_ref/synth.json" ] || $py -m mimood.cli.data synth --labelmaps "$shared/synth/labelmaps" \
        --n 20 --select 18:20 --seed 2 --out "$work/synth_ref"
    mkdir -p "$work/brats"
    for c in lesion/brats18_tcia01_425_1 lesion/brats18_tcia02_606_1 lesion/brats18_tcia13_623_1 \
             lesion_more/brats18_2013_2_1; do
      for k in t2 seg; do ln -sf "$(realpath "$shared/real/${c}_$k.nii.gz")" "$work/brats/"; done
    done ;;
  train)
    for s in vqvae mvtm atd ood; do
      $py -m mimood.cli.train $s --preset real --run "$run" --data "$work/synth_train" --data "$work/brats" \
          --source-weights 0.2,0.8 --reference "$work/synth_ref" --bf16 --resume
    done ;;
  calibrate)   # lambda and threshold of the shipped detector, "intensity" (it beat the ATD in cross-fit: benchmarks/results/crossfit.md)
    # (per scan: lambda = min(lambda, P80 of the scan's own brain tokens), RestoreConfig.lam_scan_percentile; the
    # map from the positive residual only, RestoreConfig.residual; what both hemispheres share damped by 0.75,
    # RestoreConfig.contralateral)
    $py -c "import sys; from dataclasses import replace; from mimood.config import RunConfig; from mimood.eval.calibrate import calibrate; r = sys.argv[1]; calibrate(r, replace(RunConfig.load(r + '/config.json').restore, lam_scan_percentile=80.0, residual='positive', contralateral=0.75), methods=('mimood', 'mimood_intensity'), slice_stride=4)" "$run" ;;
  export)
    $py -m mimood.cli.export -m "$run" -o "$work/export" --detector intensity
    # the shipped copy leaves out the torch backend's checkpoints and the ATD's fused copy (the intensity
    # detector never runs the ATD); it keeps the MVTM step's fused, row-skipping copy (<= 10 MB)
    $py -c "import sys; from mimood.export.slim import slim_copy; print(slim_copy(*sys.argv[1:3], ('weights', 'ort_graphs.atd')), 'bytes in', sys.argv[2])" "$work/export" "$out" ;;
  *) echo "bundle.sh: unknown stage $stage (data, train, calibrate, export)" >&2; exit 2 ;;
  esac
done
