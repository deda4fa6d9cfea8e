#!/usr/bin/env bash
# sweep.sh: every config of a grid with SEEDS seeds, one train.py call and one log per run.
#
#   bash sweep.sh                # grids/default.txt, the 12-config comparison -> results/
#   GRID=quick bash sweep.sh     # grids/quick.txt -> results/quick/ (GRID=my.txt: a file of yours -> results/my/)
#   bash sweep.sh --dry-run      # the train.py calls, one per line (with --preflight: the preflight's)
#   bash sweep.sh --preflight    # every config for two steps and one eval batch: ok or its error
#   bash sweep.sh --status       # python plot.py --status OUT: each run's status, epochs and accuracy
#
# Settings (environment variables):
#   GRID=default  grids/GRID.txt (default quick datasize cifar-resnets augment optim batch stem pool-head) or a file:
#                 "NAME ARGS..." per line, '#' starts a comment, ARGS split on blanks (no quoting)
#   OUT=          results folder (default: results for the default grid, else results/<grid name>)
#   SEEDS=1       seeds 0..SEEDS-1 of every config; runs are named <config>-s<seed>
#   EPOCHS= EXTRA=  --epochs EPOCHS and the flags EXTRA (e.g. "--data-dir /data --no-compile") for every run
#   GPUS=         e.g. 0,1,2,3: the runs dealt out over the GPUs in turn, one run at a time on each
#   NPROC=        every run under torchrun with NPROC processes (with GPUS: NPROC GPUs per run)
#   SHARD=        i/n (0-based): only the runs whose index % n == i, e.g. SHARD=$SLURM_ARRAY_TASK_ID/4
#   PREFLIGHT=1   0 skips the preflight of the configs to run, before the first run (if one fails, none starts)
#   PYTHON=python
# A run is `train.py ARGS --seed S --name NAME --out OUT --quiet --resume`: train.py skips it if finished
# or diverged, resumes it if interrupted, and leaves it to a process that trains it (the run's lock), so
# the same command again resumes a sweep, and two sweeps on one folder never train a run twice at once.
# Each ended run gets a line: train.py's last word on it, its time, and an ETA (mean time of the runs
# trained on its GPU x the runs left there). Ctrl-C or SIGTERM stops every train.py with its checkpoint.
# Exit status: 0 done; 1 a run or a preflight failed (listed at the end); 2 bad settings; 130 interrupted.
set -euo pipefail

: "${GRID:=default}" "${SEEDS:=1}" "${PYTHON:=python}" "${PREFLIGHT:=1}"
OUT=${OUT:-} EPOCHS=${EPOCHS:-} EXTRA=${EXTRA:-} GPUS=${GPUS:-} NPROC=${NPROC:-} SHARD=${SHARD:-}
HERE=$(dirname "$0") TRAIN=$HERE/train.py TRAIN=${TRAIN#./}
MODE=sweep DRY_RUN=0 STOPPED=0 LANE_PIDS=()

die() { echo "sweep: $*" >&2; exit 2; }

duration() {  # 42 -> 42s, 242 -> 4m02s, 3900 -> 1h05m
  if (($1 >= 3600)); then printf '%dh%02dm' $(($1 / 3600)) $(($1 % 3600 / 60)); return; fi
  if (($1 >= 60)); then printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); else printf '%ds' "$1"; fi
}

check_settings() {
  local v shard=${SHARD:-0/1}
  for v in SEEDS EPOCHS NPROC; do [[ ${!v} =~ ^([1-9][0-9]*)?$ ]] || die "$v=${!v}: expected a positive integer"; done
  [[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "GPUS=$GPUS: expected GPU ids like 0,1,2,3"
  [[ $PREFLIGHT == [01] ]] || die "PREFLIGHT=$PREFLIGHT: expected 1 (check the configs first) or 0"
  [[ $shard =~ ^[0-9]+/[0-9]+$ ]] && ((10#${shard%/*} < 10#${shard#*/})) ||
    die "SHARD=$SHARD: expected i/n with 0 <= i < n, e.g. SHARD=0/4"
  SHARD_I=$((10#${shard%/*})) SHARD_N=$((10#${shard#*/}))
  command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found: set PYTHON=path/to/python"
}

load_grid() {  # GRID -> CONFIGS ("NAME ARGS..." each), and OUT's default
  local file=$GRID grids line name args
  local -A seen=()
  if [[ -f $HERE/grids/$GRID.txt ]]; then file=$HERE/grids/$GRID.txt; fi
  grids=("$HERE"/grids/*.txt) grids=("${grids[@]##*/}")
  [[ -f $file ]] || die "unknown GRID=$GRID: use one of ${grids[*]%.txt}, or the path of a grid file"
  name=${file##*/} name=${name%.*} CONFIGS=()
  if [[ $GRID == default ]]; then OUT=${OUT:-results}; else OUT=${OUT:-results/$name}; fi
  while IFS= read -r line || [[ -n $line ]]; do
    # From any editor: a UTF-8 BOM and CRLF's '\r' go (a '\r' would stick to the last argument); tabs are blanks
    line=${line#$'\xef\xbb\xbf'} line=${line//$'\r'/} line=${line%%#*}
    read -r name args <<<"$line" || true
    [[ -n $name ]] || continue
    [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._+,=-]*$ ]] ||
      die "GRID=$GRID: config name '$name' is not filename-safe (use letters, digits, . _ + , = -)"
    [[ -z ${seen[$name]:-} ]] || die "GRID=$GRID: config name '$name' appears twice"
    seen[$name]=1 CONFIGS+=("$name $args")
  done <"$file"
  ((${#CONFIGS[@]})) || die "GRID=$GRID has no configs"
}

expand_runs() {  # RUNS: configs x seeds (seed 0 of each first), then SHARD; CHECKS: the configs to preflight
  local seed c name args index=0  # a run with kept weights has finished (train.py skips it): no check of its config
  RUNS=() CHECKS=()
  for ((seed = 0; seed < SEEDS; seed++)); do
    for c in "${!CONFIGS[@]}"; do
      ((index++ % SHARD_N == SHARD_I)) || continue
      read -r name args <<<"${CONFIGS[c]}"
      RUNS+=("$name-s$seed $args --seed $seed")
      if [[ $MODE == preflight || ! -f $OUT/models/$name-s$seed.pt ]]; then CHECKS[c]="$name-s0 $args --seed 0"; fi
    done
  done
  CHECKS=("${CHECKS[@]}")  # in grid order, without gaps
}

make_lanes() {  # LANES[k]: the CUDA_VISIBLE_DEVICES of lane k ("": as it is); lane k runs jobs k, k + lanes, ...
  local gpus per=${NPROC:-1} k
  IFS=, read -ra gpus <<<"$GPUS"
  ((${#gpus[@]} % per == 0)) || die "GPUS=$GPUS has ${#gpus[@]} ids, not a multiple of NPROC=$per"
  LANES=()
  for ((k = 0; k < ${#gpus[@]}; k += per)); do LANES+=("$(IFS=,; echo "${gpus[*]:k:per}")"); done
  ((${#LANES[@]})) || LANES=("")
}

train_command() {  # train_command "NAME ARGS..." -> NAME, CMD: its train.py call, ending in FLAG
  local args extra
  read -ra args <<<"$1"
  read -ra extra <<<"$EXTRA"
  NAME=${args[0]} CMD=("$PYTHON")
  if [[ -n $NPROC ]]; then CMD+=(-m torch.distributed.run --standalone "--nproc_per_node=$NPROC"); fi
  CMD+=("$TRAIN" "${args[@]:1}" --name "$NAME" --out "$OUT" --quiet ${EPOCHS:+--epochs "$EPOCHS"} "${extra[@]}" "$FLAG")
}

outcome() {  # outcome LOG FROM -> TEXT (train.py's last "NAME: " line, or ours) and its WORD: ok finished ...
  local last busy  # from line FROM: the last line (not torchrun's report), and train.py's refusal of a locked run
  { read -r last && read -r busy && read -r TEXT || true; } < <(awk -v from="$2" -v name="$NAME: " 'NR < from { next }
    /is being trained by another process/ { busy = $0 }  # anywhere: a sweep that trains the run logs here too
    /failed \(exitcode: -?[0-9]+\) local_rank/ { exit }
    /^Traceback \(most recent call last\):/ { before = last }
    /ChildFailedError/ { last = before; exit }
    index($0, name) == 1 { said = substr($0, length(name) + 1); sub(/ -> .*/, "", said) }
    NF { last = $0 }
    END { print last; print busy; print said }' "$1")
  if ((RC)) && [[ -n $busy ]]; then TEXT="busy: ${busy#error: }" WORD=busy && return; fi
  case $STOP:$RC:$FLAG:$TEXT in  # under torchrun every failing exit code is 1, a diverged run's too
    0:0:--preflight:*) TEXT=ok ;;
    *:*:--resume:interrupted*) TEXT="${TEXT%%;*} (the same command resumes it)" ;;  # torchrun: exit 1
    1:* | 0:130:*) TEXT="interrupted (the same command resumes it)" ;;
    0:0:* | 0:*:--resume:diverged*) TEXT=${TEXT:-finished} ;;
    *) TEXT="failed (exit $RC): $last" ;;
  esac
  WORD=${TEXT%%[: ]*} WORD=${WORD/already/skipped}
}

lane() {  # lane K: lane K's jobs one after another; a line on stdout and in TALLY as each ends
  local k=$1 gpu=${LANES[$1]:+ GPU ${LANES[$1]}} j n=0 total log from start took spent=0 timed=0 eta STOP=0 CHILD=
  trap 'STOP=1; if [[ -n $CHILD ]]; then kill -TERM "$CHILD" 2>/dev/null || true; fi' TERM
  trap '' INT  # Ctrl-C comes as the sweep's SIGTERM (the trap sees lane's locals); train.py stops on either
  if [[ -n ${LANES[k]} ]]; then export CUDA_VISIBLE_DEVICES=${LANES[k]}; fi
  total=$(((${#JOBS[@]} - k + ${#LANES[@]} - 1) / ${#LANES[@]}))
  for ((j = k; j < ${#JOBS[@]} && !STOP; j += ${#LANES[@]})); do
    train_command "${JOBS[j]}"
    n=$((n + 1)) log=$OUT/logs/$NAME.log start=$EPOCHSECONDS
    if [[ $FLAG == --preflight ]]; then NAME=${NAME%-s0} log=$PREFLIGHT_DIR/${NAME%-s0}.log; : >"$log"; fi
    printf '# %(%F %T)T sweep.sh: %s%s\n' -1 "${LANES[k]:+CUDA_VISIBLE_DEVICES=${LANES[k]} }" "${CMD[*]}" >>"$log"
    from=$(($(wc -l <"$log") + 1))
    "${CMD[@]}" >>"$log" 2>&1 </dev/null &
    CHILD=$!
    if ((STOP)); then kill -TERM "$CHILD" 2>/dev/null || true; fi  # a signal before CHILD was set
    while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD" || true; done  # a trap cuts a wait short
    RC=0 && wait "$CHILD" || RC=$?  # its exit status, kept by bash
    CHILD=
    outcome "$log" "$from"
    took=$((EPOCHSECONDS - start)) eta=""
    if [[ $WORD == finished || $WORD == diverged ]]; then spent=$((spent + took)) timed=$((timed + 1)); fi
    if [[ $FLAG == --resume ]] && ((n < total && !STOP)); then
      if ((timed)); then eta="  ETA $(duration $((spent * (total - n) / timed)))"; else eta="  ETA ?"; fi
    fi
    printf '%s[%d/%d%s] %s  %s  %s%s\n' "$TAG" "$n" "$total" "$gpu" "$NAME" "$TEXT" "$(duration "$took")" "$eta"
    echo "$WORD $NAME exit $RC $log" >>"$TALLY"
    if [[ $WORD == interrupted ]]; then STOP=1; fi  # a train.py stopped alone stops its lane too
  done
}

run_lanes() {  # run_lanes FLAG JOB...: the jobs over the lanes at once -> LANES_RC: 0, 1 (a job failed) or 130
  local k c
  FLAG=$1 TAG=${1/--resume/} TAG=${TAG/--preflight/preflight } JOBS=("${@:2}") LANES_RC=0 SECONDS=0
  : >"$TALLY"
  for k in "${!LANES[@]}"; do lane "$k" & LANE_PIDS+=($!); done
  until wait; do :; done  # a trap cuts a wait short
  LANE_PIDS=()  # then how they ended, and the failures
  c=$(cut -d' ' -f1 "$TALLY" | sort | uniq -c | awk '{ printf "%s%s %s", sep, $1, $2; sep = ", " }')
  echo "${TAG:-sweep of $OUT }ended: $(wc -l <"$TALLY") of ${#JOBS[@]} in $(duration "$SECONDS")${c:+: $c}" >&2
  if grep '^failed ' "$TALLY" | cut -d' ' -f2- | sed 's/^/failed  /' >&2; then LANES_RC=1; fi
  if ((STOPPED)) || grep -q '^interrupted ' "$TALLY"; then  # Ctrl-C reaches train.py too: bash may skip its trap
    ((STOPPED)) || echo "sweep: stopping every run" >&2; LANES_RC=130; fi
}

for arg; do case $arg in
  --dry-run) DRY_RUN=1 ;;
  --preflight | --status) MODE=${arg#--} ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown argument '$arg': settings are environment variables, see 'bash $0 --help'" ;;
esac; done
check_settings
load_grid
expand_runs
make_lanes
PREFLIGHT_DIR=$OUT/logs/preflight${SHARD:+-shard-$SHARD_I-of-$SHARD_N}  # shards may check one config
if [[ $MODE == status ]]; then exec "$PYTHON" "$HERE/plot.py" --status "$OUT"; fi
if ((DRY_RUN)); then
  if [[ $MODE == preflight ]]; then FLAG=--preflight JOBS=("${CHECKS[@]}"); else FLAG=--resume JOBS=("${RUNS[@]}"); fi
  for j in "${!JOBS[@]}"; do
    train_command "${JOBS[j]}" && gpu=${LANES[j % ${#LANES[@]}]} && echo "${gpu:+CUDA_VISIBLE_DEVICES=$gpu }${CMD[*]}"
  done
  exit 0
fi
mkdir -p "$OUT/logs" "$PREFLIGHT_DIR"
TALLY=$(mktemp) && trap 'rm -f "$TALLY"' EXIT
# Ctrl-C or SIGTERM: each lane stops its train.py, which keeps its checkpoint; run_lanes waits for them.
trap 'STOPPED=1; echo "sweep: stopping every run" >&2; kill -TERM "${LANE_PIDS[@]}" 2>/dev/null || true' INT TERM
if [[ $MODE == preflight ]]; then run_lanes --preflight "${CHECKS[@]}"; exit "$LANES_RC"; fi
if ((PREFLIGHT && ${#CHECKS[@]})); then
  run_lanes --preflight "${CHECKS[@]}" >&2  # a sweep's stdout: one line per run
  ((LANES_RC != 1)) || echo "sweep: no run started: fix the failing configs (or skip the check with PREFLIGHT=0)" >&2
  ((LANES_RC == 0)) || exit "$LANES_RC"
fi
run_lanes --resume "${RUNS[@]}"
exit "$LANES_RC"
