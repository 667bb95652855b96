#!/usr/bin/env bash
# Starts a new run from the finished stages of an earlier one: copies those stages' outputs into
# a fresh workdir, where the pipeline's resume skips them, then runs bitbert_jax.main there. This
# is how a sweep trains every lever from one shared start (docs/RESULTS.md, "The levers").
#
#   launch/branch_run.sh runs/xtc_stsb_3L 01_reduce,02_kd_fp32 runs/sw_lr1e3 -- \
#       --config=configs/xtc.py:task=stsb,teacher=$T,layers=3,preset=quick \
#       --config.stages.kd_1bit.lr=1e-3
#   DRY_RUN=1 launch/branch_run.sh ...   # copy, then print the command instead of running it
#
# The stage names are the source's stage folders (NN_name). The new config's pipeline must put
# the same stages at the same positions, or the pipeline will not find them and retrains them.
set -euo pipefail

die() { echo "branch_run.sh: $*" >&2; exit 2; }
usage="Usage: launch/branch_run.sh SRC_WORKDIR STAGE[,STAGE...] NEW_WORKDIR -- MAIN_FLAGS...
  copies SRC_WORKDIR/stages/STAGE/output for each STAGE into NEW_WORKDIR, then runs
  python -m bitbert_jax.main MAIN_FLAGS --workdir=NEW_WORKDIR
  DRY_RUN=1   copy, then print the command instead of running it"
if [[ ${1:-} == --help || ${1:-} == -h ]]; then echo "$usage"; exit 0; fi
[[ $# -ge 4 && $4 == -- ]] || die "$usage"
src=$1 stages=$2 new=$3
shift 4
[[ -d $src/stages ]] || die "$src: no stages/ folder (not a bitbert_jax workdir)"
[[ ! -e $new/stages ]] || die "$new/stages already exists; pick a new workdir"
IFS=',' read -ra names <<< "$stages"
for name in "${names[@]}"; do  # check all before copying any: nothing half-written
  [[ -f $src/stages/$name/output/bitbert_manifest.json ]] || \
    die "$src/stages/$name/output: no finished stage output (bitbert_manifest.json) to copy"
done
for arg in "$@"; do
  [[ $arg != --workdir* ]] || die "give the workdir as NEW_WORKDIR, not as $arg"
done
for name in "${names[@]}"; do
  mkdir -p "$new/stages/$name"
  cp -r "$src/stages/$name/output" "$new/stages/$name/"
done
cmd=(python -m bitbert_jax.main "$@" "--workdir=$new")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
