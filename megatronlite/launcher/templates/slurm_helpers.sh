# Shell functions every megatronlite sbatch script uses. `megatronlite submit` pastes this file into
# the script it renders, so a job needs nothing from launch/ at run time.

# free_port [EXTRA]: a TCP port that nobody on this host listens on, nor on the EXTRA ports after it (the
# launcher's restart k meets at port + k), starting from one derived from the job id so that jobs sharing
# a node start from different places.
free_port() {
    local extra=${1:-0} port=$((20000 + ${SLURM_JOB_ID:-0} % 20000)) k=0
    while ((k <= extra)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$((port + k))") 2>/dev/null; then  # taken: start after it
            port=$((port + k + 1))
            k=0
        else
            k=$((k + 1))
        fi
    done
    echo "$port"
}

# run_preemptible RUN_DIR COMMAND...: run the job step so that a warning signal (USR1 to this batch
# shell: `#SBATCH --signal=B:USR1@SECONDS` before the time limit, or `scancel --signal=USR1 --batch`)
# asks the trainer to save a checkpoint and stop, through the file RUN_DIR/.save_and_exit that every
# node sees. A step that stopped that way (exit code 3, or failed after the request) requeues the
# job, which resumes from the checkpoint (checkpoint.load: auto). SIGTERM (scancel, preemption, the time
# limit) would end this shell at once: it asks for a save the same way and waits for the step, but
# never requeues (a cancelled job stays cancelled; Slurm requeues what it preempts with
# PreemptMode=REQUEUE itself). The signal is not sent on to the step: Slurm sends its tasks their own
# SIGTERM (a save request to a worker, as the flag is).
run_preemptible() {
    local run_dir=$1 requested="" terminated="" woke pid rc
    shift
    trap 'woke=1; requested=1; echo "$(date +%T) warning signal: asking the trainer to save and stop"; touch "$run_dir/.save_and_exit"' USR1
    trap 'woke=1; terminated=1; echo "$(date +%T) SIGTERM: asking the trainer to save and stop"; touch "$run_dir/.save_and_exit"' TERM
    "$@" &
    pid=$!
    woke=1
    while [[ -n $woke ]]; do  # `wait` returns early when a trap runs: wait again (bash keeps an ended step's status)
        woke=""
        wait "$pid"
        rc=$?
    done
    trap - USR1 TERM
    if [[ -z $terminated && ( $rc == 3 || ( -n $requested && $rc != 0 ) ) ]]; then
        echo "$(date +%T) checkpoint saved on request (exit code $rc): requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}

# with_restarts N COMMAND...: run COMMAND again after it fails, at most N times; each attempt resumes
# from the run's last complete checkpoint (MEGATRONLITE_RESTART_COUNT tells the workers it is a restart
# and they log it in RUN_DIR/restarts.jsonl). Not after success, a bad-input error (exit code 2) or a
# save-and-stop (exit code 3, or once a stop was requested): those are not failures a restart mends.
with_restarts() {
    local max=$1 attempt=0 rc
    shift
    while :; do
        MEGATRONLITE_RESTART_COUNT=$attempt "$@"
        rc=$?
        if [[ $rc == 0 || $rc == 2 || $rc == 3 || $attempt -ge $max || -e "$RUN_DIR/.save_and_exit" ]]; then
            return "$rc"
        fi
        attempt=$((attempt + 1))
        echo "$(date +%T) the job step failed (exit code $rc): restart $attempt of $max"
    done
}
