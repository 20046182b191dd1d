#!/usr/bin/env bash
# The README's cost table of the offline DAG on synthetic corpora ("Offline DAG on a synthetic corpus"):
#   experiments/scale_table.sh <root> [HH:MM deadline, UTC]
# 10k and 100k images with configs/scale.yaml (every region source, locals and keypoints at the real per-image
# counts); 1M with configs/scale_1m.yaml (regions: FS.EGM only, locals at 10 %, no keypoints: what this machine's
# disk holds); object saliency on the first 2 shards (512 images) at every size. Resumes: sizes and stages already
# in <root>/results.json are kept, generated corpora are reused. Needs ~27 GB of disk for 10k + 100k, ~25 GB for 1M
# (13 GB of tables, 11 GB of stage outputs). Run it at nice 19 to leave the cores to other work: scale_dag gives
# each stage's session the same niceness (see experiments/scale_dag.keep_niceness).
set -euo pipefail
ROOT=${1:?usage: experiments/scale_table.sh <root> [HH:MM]}
DEADLINE=(); [[ -n "${2:-}" ]] && DEADLINE=(--deadline "$2")
PY=${PYTHON:-python}
"$PY" -m experiments.scale_dag --root "$ROOT" --sizes 10000,100000 --os-shards 2 "${DEADLINE[@]}"
"$PY" -m experiments.scale_dag --root "$ROOT" --sizes 1000000 --config configs/scale_1m.yaml --locals-fraction 0.1 \
    --keypoints 0 --os-shards 2 --stages generate,baseline,whiten,graph,object_saliency,asmk,descriptors,faiss \
    "${DEADLINE[@]}"
"$PY" -m experiments.scale_dag --root "$ROOT" --report
