#!/bin/bash
# Runs once per node of a mod-train job (srun --ntasks-per-node=1): starts the command given as
# arguments (torchrun), replacing "@NODE_RANK@" in them with this node's index in the allocation
# ($SLURM_NODEID), and forwards SIGUSR1 to the ranks, the processes torchrun started. The ranks
# finish their step, save a checkpoint together and exit (mod_train/engine/signals.py, StopSignals).
# torchrun itself ignores SIGUSR1 here (it would turn it into a shutdown with a short timeout).
args=()
for a in "$@"; do args+=("${a//@NODE_RANK@/${SLURM_NODEID:-0}}"); done

SIGNALS=0
trap 'SIGNALS=$((SIGNALS + 1))' USR1
( trap '' USR1; exec "${args[@]}" ) &
AGENT=$!

ranks() {  # the direct children of torchrun (no procps needed inside containers)
  cat /proc/"$AGENT"/task/*/children 2>/dev/null || pgrep -P "$AGENT"
}

wait "$AGENT"; RC=$?
if [ "$SIGNALS" -gt 0 ]; then
  # Forward the warning, and again every 10 s until torchrun exits: a rank that was still starting
  # (SIGUSR1 ignored until its handler is installed) gets it too; more signals change nothing.
  n=0
  while kill -0 "$AGENT" 2>/dev/null; do
    if [ $((n % 10)) -eq 0 ]; then
      PIDS=$(ranks)
      if [ -n "$PIDS" ]; then
        echo "node ${SLURM_NODEID:-0} ($(hostname)): SIGUSR1 -> ranks" $PIDS >&2
        kill -USR1 $PIDS 2>/dev/null
      fi
    fi
    n=$((n + 1))
    sleep 1
  done
  wait "$AGENT"; RC=$?
fi
exit "$RC"
