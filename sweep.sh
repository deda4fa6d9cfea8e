#!/usr/bin/env bash
# sweep.sh: run grids of train.py configs. Resumable, one log per run, nothing else.
#
#   bash sweep.sh                      # the original 12-config comparison -> results/
#   GRID=datasize bash sweep.sh        # a named grid -> results/datasize/
#   GRID=my.grid bash sweep.sh         # a grid file -> results/my/
#   bash sweep.sh --dry-run            # print the train.py commands that would run; run nothing
#   bash sweep.sh --preflight          # check every config of the grid in seconds; train nothing
#   bash sweep.sh --status             # the table of finished, running, pending and failed runs of OUT
#
# Settings (environment variables):
#   GRID=default    default | quick | datasize | cifar-resnets | augment | optim | batch | stem,
#                   or a grid file: one config per line, "NAME ARGS...", '#' starts a comment
#   OUT=            results folder, passed as --out
#                   (default: results, results/<grid>, or results/<grid file name without extension>)
#   SEEDS=1         run every config with seeds 0..SEEDS-1; run names are <config>-s<seed>
#   EPOCHS=         if set, passed as --epochs to every run
#   EXTRA=          flags added to every train.py call, e.g. EXTRA="--data-dir /data --no-compile"
#                   (split on whitespace, like a grid file's ARGS: no quoting)
#   PYTHON=python   the interpreter
#   GPUS=           e.g. 0,1,2,3: run one config per GPU at once (CUDA_VISIBLE_DEVICES per run)
#   NPROC=          run each config under torchrun with NPROC processes (with GPUS: NPROC GPUs each)
#   SHARD=          i/n (0-based): run only the runs whose index % n == i, e.g. in a Slurm array:
#                   SHARD=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
#   PREFLIGHT=1     0 skips the preflight before the first run (see below)
#
# Preflight: `train.py ARGS --preflight` runs the real path of a config for two training steps and
# one eval batch in a temporary folder. --preflight does so for every config of the grid (seed 0,
# EPOCHS and EXTRA applied; under torchrun with NPROC; one per slot at once with GPUS) and prints
# ok or the last line of its output per config (full output: OUT/logs/preflight/CONFIG.log,
# or OUT/logs/preflight-shard-I-of-N/ with SHARD).
# A sweep (make sweep too) first preflights the configs it is about to run and starts no run if one
# fails: a typo in a grid file is caught in seconds, not after hours of training. PREFLIGHT=0 skips it.
#
# To resume, run the same command again: runs whose OUT/NAME.json says "finished" or "diverged" are
# skipped, "running" ones (interrupted) continue with --resume, missing or unreadable ones start over.
# Output of each run is appended to OUT/logs/NAME.log; the terminal gets one line per run, whose
# outcome is the status in its JSON (finished, diverged; failed otherwise), not its exit code alone,
# with how long it took and an estimate of the time left: the mean measured epoch time (train +
# eval, from the JSONs of this sweep's runs) x the epochs left, over the slots.
#
# --status reads the same settings (GRID, OUT, SEEDS, SHARD) and prints each run with its epochs,
# test accuracy and mean epoch time. A run is running while train.py holds its flock on
# OUT/checkpoints/NAME.lock; interrupted if its JSON says running but nothing holds the lock;
# failed if the sweep said so as the last line of OUT/logs/NAME.log.
#
# Exit status: 0 all done; 1 some run or preflight failed (listed at the end); 2 bad settings or OUT in use;
# 130 interrupted (Ctrl-C or SIGTERM: running configs save a checkpoint first).
set -euo pipefail

GRID=${GRID:-default}
OUT=${OUT:-}
SEEDS=${SEEDS:-1}
EPOCHS=${EPOCHS:-}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-}
NPROC=${NPROC:-}
SHARD=${SHARD:-}
PREFLIGHT=${PREFLIGHT:-1}
DRY_RUN=0 PREFLIGHT_ONLY=0 STATUS_ONLY=0

GRIDS=(default quick datasize cifar-resnets augment optim batch stem)
TRAIN=$(dirname "$0")/train.py
TRAIN=${TRAIN#./}

# ---------------------------------------------------------------------------------------------
# Grids: each prints one config per line, "NAME ARGS...". Seeds are added later.

grid_default() {  # the original comparison: depth x pooling x optimizer
  local arch pool opt
  for arch in resnet18 resnet34 resnet50; do
    for pool in avg max; do
      for opt in sgd adam; do
        echo "$arch-$pool-$opt --arch $arch --pool $pool --opt $opt"
      done
    done
  done
}

grid_quick() {  # the default comparison's pooling x optimizer on ResNet-20, sized for minutes on a CPU
  # 2 epochs on 10% of the data at batch 128: 78 steps, enough for the recipe to learn (about 40% test
  # accuracy); at batch 512 it would be 18 steps, too few for the evaluation to mean much.
  local pool opt
  for pool in avg max; do
    for opt in sgd adam; do
      echo "resnet20-$pool-$opt --arch resnet20 --pool $pool --opt $opt --epochs 2 --fraction 0.1 --batch-size 128"
    done
  done
}

grid_datasize() {  # train fraction x (from scratch | ImageNet-pretrained)
  # Both arms use the ImageNet stem so that only the initial weights differ: pretrained weights
  # exist only for that stem, and the stem's own effect is what GRID=stem measures.
  local arch fraction common
  for arch in resnet18 resnet50; do
    for fraction in 0.0625 0.5 1; do
      common="--arch $arch --pool avg --opt sgd --stem imagenet --fraction $fraction"
      echo "$arch-f$fraction-scratch $common"
      echo "$arch-f$fraction-pretrained $common --pretrained"
    done
  done
}

grid_cifar_resnets() {  # the CIFAR ResNets of He et al. (2016), 6n+2 layers
  local arch
  for arch in resnet20 resnet32 resnet44 resnet56 resnet110; do
    echo "$arch --arch $arch --pool avg --opt sgd"
  done
}

grid_augment() {  # ablation: each config adds one augmentation to the previous one
  local aug="" added
  echo "resnet18-aug-none --arch resnet18 --pool avg --opt sgd --aug none"
  for added in translate flip rotate cutout jitter; do
    aug=${aug:+$aug,}$added
    echo "resnet18-aug-${aug//,/+} --arch resnet18 --pool avg --opt sgd --aug $aug"
  done
}

grid_optim() {  # optimizer x learning rate x weight decay, on resnet18
  local lr wd
  for lr in 0.1 0.4; do for wd in 5e-4 5e-5; do
    echo "resnet18-sgd-lr$lr-wd$wd --arch resnet18 --pool avg --opt sgd --lr $lr --wd $wd"
  done; done
  for lr in 1e-3 3e-4; do for wd in 0 5e-4; do
    echo "resnet18-adam-lr$lr-wd$wd --arch resnet18 --pool avg --opt adam --lr $lr --wd $wd"
  done; done
  for lr in 1e-3 3e-4; do for wd in 0.05 5e-4; do
    echo "resnet18-adamw-lr$lr-wd$wd --arch resnet18 --pool avg --opt adamw --lr $lr --wd $wd"
  done; done
}

grid_batch() {  # batch size under the linear scaling rule
  # No --lr: train.py's sgd default is already 0.4 at batch 512, scaled linearly with the batch.
  local batch
  for batch in 64 128 256 512 1024; do
    echo "resnet18-bs$batch --arch resnet18 --pool avg --opt sgd --batch-size $batch"
  done
}

grid_stem() {  # CIFAR stem (3x3 conv) against ImageNet stem (7x7/2 conv + max pool)
  local arch stem
  for arch in resnet18 resnet34 resnet50; do
    for stem in cifar imagenet; do
      echo "$arch-stem-$stem --arch $arch --pool avg --opt sgd --stem $stem"
    done
  done
}

grid_file() {  # a grid file: "NAME ARGS..." per line; blank lines and '#' comments ignored
  # Text from any editor: a UTF-8 BOM and CRLF's '\r' are dropped (a '\r' left on would be glued to a
  # run's last argument); tabs and trailing spaces separate words as spaces do.
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line#$'\xef\xbb\xbf'} line=${line//$'\r'/} line=${line%%#*}
    if [[ $line =~ [^[:space:]] ]]; then echo "$line"; fi
  done <"$1"
}

# ---------------------------------------------------------------------------------------------
# Helpers

die() { echo "sweep: $*" >&2; exit 2; }
note() { echo "$*" >&2; }

fmt_duration() {  # 42 -> 42s, 242 -> 4m02s, 3900 -> 1h05m
  local s=$1
  if ((s >= 3600)); then printf '%dh%02dm' $((s / 3600)) $((s % 3600 / 60))
  elif ((s >= 60)); then printf '%dm%02ds' $((s / 60)) $((s % 60))
  else printf '%ds' "$s"; fi
}

quote_command() {  # quote only the words that need it, so printed commands stay readable
  local word quoted words=()
  for word; do
    if [[ $word =~ ^[A-Za-z0-9_./,+=:@%-]+$ ]]; then words+=("$word")
    else printf -v quoted '%q' "$word"; words+=("$quoted"); fi
  done
  echo "${words[*]}"
}

read_records() {  # read_records JSON...: one line per file, STATUS TEST_ACC EPOCHS_DONE EPOCHS EPOCH_MS MEAN_EPOCH
  # e.g. "finished 93.12% 10 10 431000 41.2s": EPOCH_MS sums the recorded epochs' train and eval
  # times; TEST_ACC is the last epoch's until the run ends; "missing - 0 - 0 -" if absent or unreadable
  "$PYTHON" -c '
import json, re, sys
for path in sys.argv[1:]:
    try:
        record = json.load(open(path))
        status, history, final = record["status"], record.get("history") or [], record.get("final") or {}
        assert re.fullmatch(r"[a-z]+", status)  # one word, as the fields are split on spaces
        acc = final.get("test_acc", history[-1].get("test_acc") if history else None)
        epochs = (record.get("config") or {}).get("epochs")
        ms = round(1000 * sum(h.get("epoch_time_s", 0) + h.get("eval_time_s", 0) for h in history))
        times = [h["epoch_time_s"] for h in history if "epoch_time_s" in h]
        mean = final.get("mean_epoch_time_s") or (sum(times) / len(times) if times else None)
        print(status, "-" if acc is None else f"{100 * acc:.2f}%", len(history),
              epochs if isinstance(epochs, int) and epochs > 0 else "-", ms, "-" if mean is None else f"{mean:.1f}s")
    except Exception:
        print("missing - 0 - 0 -")
' "$@" 2>/dev/null
}

load_records() {  # load_records RUN_INDEX...: RECORD[i] = the read_records line of each run's JSON
  local i k=0 paths=() lines=()
  for i; do paths+=("$OUT/${RUN_NAMES[i]}.json"); done
  mapfile -t lines < <(read_records "${paths[@]}" || true)
  for i; do RECORD[i]=${lines[k]:-missing - 0 - 0 -} k=$((k + 1)); done
}

# ---------------------------------------------------------------------------------------------
# Settings -> the list of runs

parse_args() {
  local arg
  for arg; do
    case $arg in
      --dry-run) DRY_RUN=1 ;;
      --preflight) PREFLIGHT_ONLY=1 ;;
      --status) STATUS_ONLY=1 ;;
      -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
      *) die "unknown argument '$arg': settings are environment variables, see 'bash $0 --help'" ;;
    esac
  done
  if ((STATUS_ONLY && (DRY_RUN || PREFLIGHT_ONLY))); then die "--status goes alone"; fi
}

check_settings() {
  local positive='^[1-9][0-9]*$'
  [[ $SEEDS =~ $positive ]] || die "SEEDS=$SEEDS: expected a positive integer"
  [[ -z $EPOCHS || $EPOCHS =~ $positive ]] || die "EPOCHS=$EPOCHS: expected a positive integer"
  [[ -z $NPROC || $NPROC =~ $positive ]] || die "NPROC=$NPROC: expected a positive integer"
  [[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "GPUS=$GPUS: expected GPU ids like 0,1,2,3"
  [[ $PREFLIGHT == [01] ]] || die "PREFLIGHT=$PREFLIGHT: expected 1 (check the configs first) or 0"
  local bad_shard="SHARD=$SHARD: expected i/n with 0 <= i < n, e.g. SHARD=0/4"
  SHARD_I=0 SHARD_N=1
  if [[ -n $SHARD ]]; then
    [[ $SHARD =~ ^([0-9]+)/([0-9]+)$ ]] || die "$bad_shard"
    SHARD_I=$((10#${BASH_REMATCH[1]})) SHARD_N=$((10#${BASH_REMATCH[2]}))
    ((SHARD_I < SHARD_N)) || die "$bad_shard"
  fi
  command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found: set PYTHON=path/to/python"
}

load_grid() {  # GRID -> CONFIG_NAMES, CONFIG_ARGS; default OUT
  local configs name args
  local -A seen=()
  if [[ " ${GRIDS[*]} " == *" $GRID "* ]]; then
    configs=$("grid_${GRID//-/_}")
    if [[ $GRID == default ]]; then OUT=${OUT:-results}; else OUT=${OUT:-results/$GRID}; fi
  elif [[ -f $GRID ]]; then
    configs=$(grid_file "$GRID")
    name=$(basename "$GRID")
    OUT=${OUT:-results/${name%.*}}
  else
    die "unknown GRID=$GRID: use one of ${GRIDS[*]}, or the path of a grid file"
  fi
  CONFIG_NAMES=() CONFIG_ARGS=()
  while read -r name args; do
    [[ -n $name ]] || continue
    [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._+,=-]*$ ]] ||
      die "GRID=$GRID: config name '$name' is not filename-safe (use letters, digits, . _ + , = -)"
    [[ -z ${seen[$name]:-} ]] || die "GRID=$GRID: config name '$name' appears twice"
    seen[$name]=1
    CONFIG_NAMES+=("$name") CONFIG_ARGS+=("$args")
  done <<<"$configs"
  ((${#CONFIG_NAMES[@]})) || die "GRID=$GRID has no configs"
}

expand_runs() {  # configs x seeds, seed-major so that seed 0 of every config comes first; then SHARD
  local seed c index=0
  RUN_NAMES=() RUN_ARGS=() RUN_CONFIG=()
  for ((seed = 0; seed < SEEDS; seed++)); do
    for c in "${!CONFIG_NAMES[@]}"; do
      if ((index % SHARD_N == SHARD_I)); then
        RUN_NAMES+=("${CONFIG_NAMES[c]}-s$seed")
        RUN_ARGS+=("${CONFIG_ARGS[c]} --seed $seed")
        RUN_CONFIG+=("$c")
      fi
      index=$((index + 1))
    done
  done
}

plan_runs() {  # RUN_STATUS from each run's JSON -> PENDING (indices of runs to start); notes the skips
  local i status acc
  RUN_STATUS=() PENDING=() RECORD=()
  load_records "${!RUN_NAMES[@]}"
  for i in "${!RUN_NAMES[@]}"; do
    read -r status acc _ <<<"${RECORD[i]}"
    RUN_STATUS[i]=$status
    case $status in
      finished | diverged) note "skip  ${RUN_NAMES[i]}  $status  test_acc $acc" ;;
      *) PENDING+=("$i") ;;
    esac
  done
}

configs_of() {  # configs_of RUN_INDEX... -> CONFIGS: the distinct configs of those runs, in grid order
  local i c
  local -A wanted=()
  for i; do wanted[${RUN_CONFIG[i]}]=1; done
  CONFIGS=()
  for c in "${!CONFIG_NAMES[@]}"; do
    if [[ -n ${wanted[$c]:-} ]]; then CONFIGS+=("$c"); fi
  done
}

build_command() {  # build_command NAME ARGS -> CMD, the train.py call of a run of that name and args
  local name=$1 args extra
  read -ra args <<<"$2"
  read -ra extra <<<"$EXTRA"
  if [[ -n $NPROC ]]; then
    # torchrun's own module, so that it uses $PYTHON
    CMD=("$PYTHON" -m torch.distributed.run --standalone "--nproc_per_node=$NPROC" "$TRAIN")
  else
    CMD=("$PYTHON" "$TRAIN")
  fi
  CMD+=("${args[@]}" --name "$name" --out "$OUT" --quiet)
  if [[ -n $EPOCHS ]]; then CMD+=(--epochs "$EPOCHS"); fi
  CMD+=("${extra[@]}")
}

run_command() {  # run_command RUN_INDEX -> CMD, resuming the run if it was interrupted
  build_command "${RUN_NAMES[$1]}" "${RUN_ARGS[$1]}"
  if [[ ${RUN_STATUS[$1]} == running ]]; then CMD+=(--resume); fi
}

preflight_command() {  # preflight_command CONFIG_INDEX -> CMD that checks the config: seed 0, never resumed
  build_command "${CONFIG_NAMES[$1]}-s0" "${CONFIG_ARGS[$1]} --seed 0"
  CMD+=(--preflight)  # train.py then trains into a temporary folder; --name and --out are ignored
}

# ---------------------------------------------------------------------------------------------
# Running: a pool of SLOTS (one without GPUS), each running one train.py in the background

take_lock() {  # one sweep per OUT; shards of one sweep share OUT, so each locks only its share
  exec 9>"$OUT/.sweep.lock"
  if ((SHARD_N == 1)); then
    flock -n 9 || die "another sweep is running on $OUT ($OUT/.sweep.lock is held)"
  else
    exec 8>"$OUT/.sweep.shard-$SHARD_I-of-$SHARD_N.lock"
    { flock -n -s 9 && flock -n 8; } ||
      die "another sweep is running on $OUT or on its shard $SHARD ($OUT/.sweep*.lock is held)"
  fi
  # train.py inherits the lock: a run orphaned by a killed sweep still keeps other sweeps out
}

make_slots() {  # SLOTS[k] = the CUDA_VISIBLE_DEVICES of slot k ("" leaves it unset)
  local gpus per=${NPROC:-1} k
  SLOTS=("")
  if [[ -z $GPUS ]]; then return; fi
  IFS=, read -ra gpus <<<"$GPUS"
  ((${#gpus[@]} % per == 0)) || die "GPUS=$GPUS has ${#gpus[@]} ids, not a multiple of NPROC=$per"
  SLOTS=()
  for ((k = 0; k < ${#gpus[@]}; k += per)); do
    SLOTS+=("$(IFS=,; echo "${gpus[*]:k:per}")")
  done
}

free_slot() {  # print a slot that no running job uses; fail if all are busy
  local k key
  for k in "${!SLOTS[@]}"; do
    for key in "${!RUNNING[@]}"; do
      if [[ ${RUNNING[key]} == "$k" ]]; then continue 2; fi
    done
    echo "$k"
    return 0
  done
  return 1
}

start_pool() {  # get ready to run train.py calls in the background, SLOTS at a time
  RUNNING=() PGID=() STARTED=() INTERRUPTED=0
  RC_DIR=$(mktemp -d)
  trap 'rm -rf "$RC_DIR"' EXIT
  trap on_signal INT TERM
  # Job control puts each job in its own process group: Ctrl-C then reaches only the sweep, which
  # passes one SIGINT to each job (without it, background jobs would ignore SIGINT altogether).
  set -m
  # A sweep itself started in the background (`bash sweep.sh &` in a script) ignores SIGINT and its
  # jobs would inherit that; env --default-signal (coreutils >= 8.31) gives them SIGINT back.
  LAUNCHER=(env)
  if env --default-signal=INT true 2>/dev/null; then LAUNCHER+=(--default-signal=INT); fi
}

start_job() {  # start_job KEY SLOT LOG: run CMD in the background on that slot; its exit code goes to RC_DIR/KEY
  local key=$1 slot=$2 log=$3 gpus=()
  if [[ -n ${SLOTS[slot]} ]]; then gpus=("CUDA_VISIBLE_DEVICES=${SLOTS[slot]}"); fi
  printf '# %(%F %T)T sweep.sh: %s\n' -1 "$(quote_command "${gpus[@]}" "${CMD[@]}")" >>"$log"
  (
    rc=0
    "${LAUNCHER[@]}" "${gpus[@]}" "${CMD[@]}" >>"$log" 2>&1 </dev/null || rc=$?
    echo "$rc" >"$RC_DIR/$key"
  ) &
  RUNNING[key]=$slot
  PGID[key]=$!
  STARTED[key]=$EPOCHSECONDS
}

run_pool() {  # run_pool START FINISH KEY...: `START KEY SLOT` as slots free up, `FINISH KEY EXIT_CODE` as jobs end
  local start=$1 finish=$2 key slot
  shift 2
  for key; do
    if ((INTERRUPTED)); then break; fi
    until slot=$(free_slot); do wait_for_a_job "$finish"; done
    if ((INTERRUPTED)); then break; fi
    "$start" "$key" "$slot"
  done
  while ((${#RUNNING[@]})); do wait_for_a_job "$finish"; done
}

wait_for_a_job() {  # wait_for_a_job FINISH: sleep until a job ends or a signal arrives, then FINISH the ended ones
  local key rc
  wait -n || true
  for key in "${!RUNNING[@]}"; do
    if [[ ! -s $RC_DIR/$key ]] && kill -0 -- "-${PGID[key]}" 2>/dev/null; then continue; fi
    rc=137  # gone without an exit code: killed together with its subshell
    if [[ -s $RC_DIR/$key ]]; then rc=$(<"$RC_DIR/$key"); fi
    rm -f "$RC_DIR/$key"
    unset "RUNNING[key]"
    "$1" "$key" "$rc"
  done
}

on_signal() {  # start no more jobs; ask the running ones to save a checkpoint and exit
  local key
  INTERRUPTED=1
  note "sweep: interrupted; waiting for ${#RUNNING[@]} running job(s) to save a checkpoint"
  for key in "${!RUNNING[@]}"; do kill -INT -- "-${PGID[key]}" 2>/dev/null || true; done
}

# ---------------------------------------------------------------------------------------------
# Preflight: each config once, for a few steps, before hours of training

# Shards of one sweep may check the same config (its seeds are spread over them): one folder each.
preflight_dir() { echo "$OUT/logs/preflight${SHARD:+-shard-$SHARD_I-of-$SHARD_N}"; }
preflight_log() { echo "$(preflight_dir)/${CONFIG_NAMES[$1]}.log"; }

last_output_line() {  # last_output_line LOG: the last non-blank line a job wrote (below sweep.sh's header)
  # torchrun appends its own failure report (a log line, then a ChildFailedError traceback) after
  # the ranks' output: the line that tells is the last one before it.
  awk 'NR == 1 { next }
       /failed \(exitcode: -?[0-9]+\) local_rank/ { exit }
       /^Traceback \(most recent call last\):/ { before = last }
       /ChildFailedError/ { last = before; exit }
       NF { last = $0 }
       END { print last }' "$1"
}

start_preflight() {  # start_preflight CONFIG_INDEX SLOT
  local log
  log=$(preflight_log "$1")
  : >"$log"  # one attempt per log: its last line is this attempt's
  preflight_command "$1"
  start_job "$1" "$2" "$log"
}

finish_preflight() {  # finish_preflight CONFIG_INDEX EXIT_CODE: print the config's line, count it
  local c=$1 rc=$2 outcome log
  log=$(preflight_log "$c")
  N_CHECKED=$((N_CHECKED + 1))
  case $rc in
    0) outcome=ok ;;
    130) outcome=interrupted INTERRUPTED=1 ;;
    *)
      outcome="failed (exit $rc): $(last_output_line "$log")"
      PREFLIGHT_FAILURES+=("${CONFIG_NAMES[c]}  exit $rc  $log") ;;
  esac
  printf 'preflight [%*d/%d] %-*s  %s  %s\n' "${#N_TO_CHECK}" "$N_CHECKED" "$N_TO_CHECK" \
    "$NAME_WIDTH" "${CONFIG_NAMES[c]}" "$(fmt_duration $((EPOCHSECONDS - STARTED[c])))" "$outcome"
}

preflight() {  # preflight CONFIG_INDEX...: check those configs; the failures go to PREFLIGHT_FAILURES
  local c failure
  PREFLIGHT_FAILURES=() N_CHECKED=0 N_TO_CHECK=$# NAME_WIDTH=0
  for c; do
    if ((${#CONFIG_NAMES[c]} > NAME_WIDTH)); then NAME_WIDTH=${#CONFIG_NAMES[c]}; fi
  done
  mkdir -p "$(preflight_dir)"
  run_pool start_preflight finish_preflight "$@"
  note "preflight: $N_CHECKED of $# configs checked, $((N_CHECKED - ${#PREFLIGHT_FAILURES[@]})) ok," \
    "${#PREFLIGHT_FAILURES[@]} failed"
  for failure in "${PREFLIGHT_FAILURES[@]}"; do note "failed  $failure"; done
  if ((INTERRUPTED)); then exit 130; fi
}

# ---------------------------------------------------------------------------------------------
# Training runs

start_run() {  # start_run RUN_INDEX SLOT
  local gpus=${SLOTS[$2]}
  N_STARTED=$((N_STARTED + 1))
  note "start  ${RUN_NAMES[$1]}  (run $N_STARTED of $TOTAL${gpus:+, GPU $gpus})"
  run_command "$1"
  start_job "$1" "$2" "$OUT/logs/${RUN_NAMES[$1]}.log"
}

finish_run() {  # finish_run RUN_INDEX EXIT_CODE: print the run's line, count it, say it in its log
  local i=$1 rc=$2 name=${RUN_NAMES[$1]} status acc outcome detail eta="" seconds
  local log="$OUT/logs/$name.log" elapsed=$((EPOCHSECONDS - STARTED[$1]))
  N_DONE=$((N_DONE + 1)) ENDED[i]=1
  load_records "$i"
  read -r status acc _ <<<"${RECORD[i]}"
  detail="test_acc $acc"
  # The JSON tells how a run ended: torchrun turns every failing exit code (3, diverged, too) into 1.
  case $rc:$status in
    130:*) outcome=interrupted detail="log $log" INTERRUPTED=1 ;;
    *:finished | *:diverged)
      outcome=$status
      TIMED_SECONDS=$((TIMED_SECONDS + elapsed)) TIMED_RUNS=$((TIMED_RUNS + 1)) ;;
    *) outcome="failed (exit $rc, status $status)" detail="log $log" FAILURES+=("$name  exit $rc  $log") ;;
  esac
  printf '# %(%F %T)T sweep.sh: run ended: %s\n' -1 "$outcome" >>"$log"  # what --status reads
  if [[ ${RUN_STATUS[i]} == running ]]; then outcome+=" (resumed)"; fi
  if ((!INTERRUPTED && N_DONE < TOTAL)); then
    seconds=$(time_left)
    if [[ -n $seconds ]]; then eta="  ETA $(fmt_duration "$seconds")"; else eta="  ETA ?"; fi
  fi
  printf '[%*d/%d] %-*s  %s  %s  %s%s\n' "$INDEX_WIDTH" "$N_DONE" "$TOTAL" \
    "$NAME_WIDTH" "$name" "$outcome" "$detail" "$(fmt_duration "$elapsed")" "$eta"
}

time_left() {  # print the seconds the runs not ended yet should take; nothing if there is no measure
  # The mean of every epoch measured in this sweep's JSONs, times the epochs left, over the slots.
  # A run with no JSON yet is taken to train as many epochs as the recorded runs do on average.
  local i status acc done epochs ms measured_ms=0 measured=0 planned=0 recorded=0 left=0 runs_left=0
  load_records "${!RUN_NAMES[@]}"
  for i in "${!RUN_NAMES[@]}"; do
    read -r status acc done epochs ms _ <<<"${RECORD[i]}"
    measured_ms=$((measured_ms + ms)) measured=$((measured + done))
    if [[ $epochs != - ]]; then planned=$((planned + epochs)) recorded=$((recorded + 1)); fi
  done
  for i in "${PENDING[@]}"; do
    if [[ -n ${ENDED[i]:-} ]]; then continue; fi
    read -r status acc done epochs ms _ <<<"${RECORD[i]}"
    runs_left=$((runs_left + 1))
    if [[ $epochs != - ]]; then left=$((left + (epochs > done ? epochs - done : 0)))
    elif ((recorded)); then left=$((left + planned / recorded))
    else measured=0; fi  # epochs left unknown: fall back to wall time
  done
  if ((measured)); then
    echo $((measured_ms * left / (measured * 1000 * ${#SLOTS[@]})))
  elif ((TIMED_RUNS)); then
    echo $((TIMED_SECONDS * runs_left / (TIMED_RUNS * ${#SLOTS[@]})))
  fi
}

# ---------------------------------------------------------------------------------------------
# Status of a results folder

lock_is_held() {  # lock_is_held FILE: some process (a running train.py) holds a flock on FILE
  local rc=0
  [[ -e $1 ]] || return 1
  flock -n -s -E 75 "$1" true 2>/dev/null || rc=$?
  ((rc == 75))
}

sweep_verdict() {  # sweep_verdict LOG: what the sweep said of the run's last attempt, if it said anything
  local last=""
  if [[ -f $1 ]]; then last=$(tail -n 1 "$1"); fi
  if [[ $last == "# "*" sweep.sh: run ended: "* ]]; then echo "${last#* sweep.sh: run ended: }"; fi
}

print_status() {  # the table of the grid's runs in OUT, and a count line
  local i status acc done epochs ms mean shown verdict kind width=3 line=""
  local -A count=()
  load_records "${!RUN_NAMES[@]}"
  for i in "${!RUN_NAMES[@]}"; do
    if ((${#RUN_NAMES[i]} > width)); then width=${#RUN_NAMES[i]}; fi
  done
  printf '%-*s  %7s  %8s  %10s  %s\n' "$width" run epochs "test acc" "epoch time" status
  for i in "${!RUN_NAMES[@]}"; do
    read -r status acc done epochs ms mean <<<"${RECORD[i]}"
    verdict=$(sweep_verdict "$OUT/logs/${RUN_NAMES[i]}.log")
    if [[ $status == finished || $status == diverged ]]; then kind=$status shown=$status
    elif lock_is_held "$OUT/checkpoints/${RUN_NAMES[i]}.lock"; then kind=running shown=running
    elif [[ $verdict == failed* ]]; then kind=failed shown=$verdict
    elif [[ $status == running ]]; then kind=interrupted shown="interrupted (resume with make sweep)"
    else kind=pending shown=pending; fi
    count[$kind]=$((${count[$kind]:-0} + 1))
    if [[ $epochs == - ]]; then epochs=-; else epochs="$done/$epochs"; fi
    printf '%-*s  %7s  %8s  %10s  %s\n' "$width" "${RUN_NAMES[i]}" "$epochs" "$acc" "$mean" "$shown"
  done
  for kind in finished diverged running interrupted failed pending; do
    if [[ -n ${count[$kind]:-} ]]; then line+=", ${count[$kind]} $kind"; fi
  done
  echo "${#RUN_NAMES[@]} runs in $OUT${SHARD:+ (shard $SHARD)}: ${line#, }"
}

# ---------------------------------------------------------------------------------------------
# Main

parse_args "$@"
check_settings
load_grid
expand_runs
make_slots

if ((STATUS_ONLY)); then
  print_status
  exit 0
fi

if ((PREFLIGHT_ONLY)); then
  configs_of "${!RUN_NAMES[@]}"
  if ((DRY_RUN)); then
    for c in "${CONFIGS[@]}"; do preflight_command "$c"; quote_command "${CMD[@]}"; done
    exit 0
  fi
  [[ -f $TRAIN ]] || die "$TRAIN not found"
  start_pool
  preflight "${CONFIGS[@]}"
  if ((${#PREFLIGHT_FAILURES[@]})); then exit 1; fi
  exit 0
fi

if ((!DRY_RUN)); then
  mkdir -p "$OUT/logs"
  take_lock
fi
plan_runs
note "GRID=$GRID OUT=$OUT: ${#RUN_NAMES[@]} runs${SHARD:+ in shard $SHARD}, ${#PENDING[@]} to run"

if ((DRY_RUN)); then
  for i in "${PENDING[@]}"; do
    run_command "$i"
    quote_command "${CMD[@]}"
  done
  exit 0
fi
if ((${#PENDING[@]} == 0)); then exit 0; fi
[[ -f $TRAIN ]] || die "$TRAIN not found"

start_pool
if ((PREFLIGHT)); then
  configs_of "${PENDING[@]}"
  preflight "${CONFIGS[@]}" >&2
  if ((${#PREFLIGHT_FAILURES[@]})); then
    note "sweep: no run started: fix the failing configs (or skip the check with PREFLIGHT=0)"
    exit 1
  fi
fi

FAILURES=() ENDED=() N_STARTED=0 N_DONE=0 TIMED_SECONDS=0 TIMED_RUNS=0 SWEEP_START=$EPOCHSECONDS
TOTAL=${#PENDING[@]}
INDEX_WIDTH=${#TOTAL} NAME_WIDTH=0  # INDEX_WIDTH: digits in the number of runs
for i in "${PENDING[@]}"; do
  if ((${#RUN_NAMES[i]} > NAME_WIDTH)); then NAME_WIDTH=${#RUN_NAMES[i]}; fi
done
run_pool start_run finish_run "${PENDING[@]}"

note "$N_DONE of $TOTAL runs ended in $(fmt_duration $((EPOCHSECONDS - SWEEP_START))), ${#FAILURES[@]} failed;" \
  "results in $OUT"
for failure in "${FAILURES[@]}"; do note "failed  $failure"; done
if ((INTERRUPTED)); then note "interrupted: run the same command again to resume"; exit 130; fi
if ((${#FAILURES[@]})); then exit 1; fi
