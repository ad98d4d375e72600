#!/usr/bin/env bash
# Every speed and memory figure of issue 11's "done when" for the CPU at hand, in one command:
#
#     bench/cpu_report.sh TAG            # e.g. TAG=epyc-zen4-dec03; writes docs/bench/cpu/TAG/
#     .venv/bin/python bench/cpu_report.py docs/bench/cpu/TAG   # the markdown tables
#
# Needs `make setup` and `make bench-setup`. Run it ALONE on the machine (a second torch process
# on the same cores slows both 10-20x). About 50-60 min on a 2-core VM (Zen 4, 2026-12-03). Resumable: a piece whose
# output exists is skipped, so after an interruption run the same command again (delete a
# piece's file to redo it).
#
# Pieces, in order (each file holds its own command line at its top or in its JSON):
#   cpu.txt              lscpu's model name and flags, torch's threads, the commit
#   matmul.txt           bench/matmul.py: fp32 / bf16 GEMM rates
#   {on,off}-{fp32,bf16}-r{1,2}/   8-step `agro train` runs, on-policy (fresh groups) and offline
#                        (source=offline from a file sampled from pi_ref, one per precision), no evaluation or
#                        checkpoints; two rounds in the order on, off per precision, so the
#                        VM's drift shows between rounds. metrics.jsonl has each phase's seconds,
#                        FLOP, rate and fraction of the GEMM peak measured at the run's start.
#   vs_trl-{fp32,bf16}.json        bench/vs_trl.py, agro vs TRL 1.16's GRPOTrainer side by side
#   main-job/            `make train`'s job (`agro train`, precision=auto with an empty
#                        calibration cache, as on a fresh machine) under /usr/bin/time -v;
#   main-job-{fp32|bf16}/  the same job in the precision auto did not pick (RSS target: both)
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:?usage: bench/cpu_report.sh TAG}
OUT=docs/bench/cpu/$TAG
PY=.venv/bin/python
BPY=.venv-bench/bin/python
STEPS=${STEPS:-8}
# PIECES: which measurements after cpu.txt and matmul.txt, a comma list of steps (the offline
# files and 8-step runs), trl (vs_trl) and main (the default job in both precisions); all three
# by default. E.g. `PIECES=main bench/cpu_report.sh TAG` re-measures only the default job (~25 min).
PIECES=${PIECES:-steps,trl,main}
# PRECISIONS: the precisions of the step runs and TRL rounds, and of the default job's second run
# (the one auto did not pick); both by default. E.g. `PRECISIONS=bf16` after a bf16-only change.
PRECISIONS=${PRECISIONS:-fp32 bf16}
want() { [[ ",$PIECES," == *",$1,"* ]]; }
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
prune() { rm -rf "$1/checkpoints" "$1/final" "$1/tb"; }   # a run's saved state (1.6-2 GB), not its logs

# the CPU's identity as agro's calibration cache keys it (model, flags, threads, torch)
machine() { $PY -c "from agro.perf import machine_key; print(machine_key())"; }
if [[ -s $OUT/machine.txt && "$(machine)" != "$(cat "$OUT/machine.txt")" ]]; then
  echo "$OUT was started on another CPU ($(cat "$OUT/machine.txt")); this is $(machine): use a new TAG" >&2
  exit 2
fi
machine > "$OUT/machine.txt"
if [[ -s $OUT/src-commit.txt && "$(git log -1 --format=%h -- src)" != "$(cat "$OUT/src-commit.txt")" ]]; then
  echo "$OUT was started on src/ at $(cat "$OUT/src-commit.txt"); src/ is now $(git log -1 --format=%h -- src): use a new TAG" >&2
  exit 2
fi
git log -1 --format=%h -- src > "$OUT/src-commit.txt"
if [[ ! -s $OUT/cpu.txt ]]; then
  { echo "date: $(date -u +%FT%TZ)"; echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo ' (src modified)')"
    lscpu | grep -E "Model name|^CPU\(s\)|Thread|MHz|CPU family|^Model:"   # family 25 = Zen 3/4, 26 = Zen 5
    echo "flags: $(grep -o -w -E 'avx2|avx512f|avx512bw|avx512vl|avx512_bf16|avx512_vnni|avx512_vp2intersect|avx_vnni|amx_bf16|amx_tile|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    $PY -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"
  } > "$OUT/cpu.txt.tmp" && mv "$OUT/cpu.txt.tmp" "$OUT/cpu.txt"
fi

if [[ ! -s $OUT/matmul.txt ]]; then
  log matmul
  { echo "\$ $PY bench/matmul.py"; $PY bench/matmul.py; } > "$OUT/matmul.txt.tmp" && mv "$OUT/matmul.txt.tmp" "$OUT/matmul.txt"
fi

QUIET=(eval_prompts=0 save_every=0 save_final=false plot=false tensorboard=false progress=false overwrite=true)
offline_file() {   # offline_file PRECISION: groups sampled from pi_ref, reference log-probs in
  # PRECISION (a run checks that its file's reference is its own, precision included); 8 prompts
  # per step x STEPS steps, so each group is used once (no epoch repeats)
  local f=$OUT/offline-pi_ref-$1.jsonl
  if [[ ! -s $f ]]; then
    log "offline file $1"
    echo "\$ $PY -m agro.cli generate output=$f num_prompts=$((8 * STEPS)) precision=$1" > "$OUT/offline-generate-$1.command.txt"
    $PY -m agro.cli generate output="$f.tmp.jsonl" num_prompts=$((8 * STEPS)) precision=$1 \
      > "$OUT/offline-generate-$1.log" 2>&1
    mv "$f.tmp.jsonl" "$f"
  fi
}
if want steps; then
for p in $PRECISIONS; do offline_file "$p"; done
fi

run() {   # run NAME ARGS...: one 8-step training run into $OUT/NAME (skipped when it finished)
  local name=$1; shift
  [[ -s $OUT/$name/done ]] && return 0
  log "$name"
  rm -rf "$OUT/$name"; mkdir -p "$OUT/$name"
  echo "\$ $PY -m agro.cli train steps=$STEPS $* ${QUIET[*]} output_dir=$OUT/$name" > "$OUT/$name/command.txt"
  /usr/bin/time -v $PY -m agro.cli train steps="$STEPS" "$@" "${QUIET[@]}" output_dir="$OUT/$name" \
    > "$OUT/$name/log.txt" 2>&1
  prune "$OUT/$name"
  date -u +%FT%TZ > "$OUT/$name/done"
}
for r in 1 2; do
  want steps || break
  for p in $PRECISIONS; do
    run on-$p-r$r precision=$p
    run off-$p-r$r precision=$p source=offline offline_path="$OUT/offline-pi_ref-$p.jsonl"
  done
done

for p in $PRECISIONS; do
  want trl || break
  if [[ ! -s $OUT/vs_trl-$p.json ]]; then
    log "vs_trl $p"
    $BPY bench/vs_trl.py --steps 6 --micro-batch 32 --precision $p --quiet --json "$OUT/vs_trl-$p.json.tmp" \
      > "$OUT/vs_trl-$p.log" 2>&1
    mv "$OUT/vs_trl-$p.json.tmp" "$OUT/vs_trl-$p.json"
  fi
done

main_job() {   # main_job NAME [ARGS...]: the default job (`make train`) under /usr/bin/time -v
  local name=$1; shift
  [[ -s $OUT/$name/done ]] && return 0
  log "$name"
  rm -rf "$OUT/$name" "$OUT/$name-cache"; mkdir -p "$OUT/$name-cache"
  echo "\$ AGRO_CACHE_DIR=<empty dir> /usr/bin/time -v $PY -m agro.cli train $* output_dir=$OUT/$name progress=false" \
    > "$OUT/$name.command.txt"
  # exactly `make train`'s job (progress=false only hides the bar; an empty calibration cache as
  # on a fresh machine); its checkpoints, exported final/ model and TensorBoard files (about
  # 2 GB) are deleted afterwards, keeping the logs and curves.
  AGRO_CACHE_DIR="$OUT/$name-cache" /usr/bin/time -v $PY -m agro.cli train "$@" output_dir="$OUT/$name" \
    progress=false > "$OUT/$name.log" 2>&1
  rm -rf "$OUT/$name-cache"; prune "$OUT/$name"
  date -u +%FT%TZ > "$OUT/$name/done"
}
if want main; then
main_job main-job                       # precision=auto: what a user gets
# the issue's RSS target holds "in either precision": the same job in the one auto did not pick
chosen=$(sed -n 's/^precision: *//p' "$OUT/main-job/config.yaml" | head -1)
other=$([[ $chosen == bf16 ]] && echo fp32 || echo bf16)
[[ " $PRECISIONS " == *" $other "* ]] && main_job main-job-$other precision=$other
fi
log "done: .venv/bin/python bench/cpu_report.py $OUT"
