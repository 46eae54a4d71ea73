# Shell functions every megatronlite sbatch script uses. `megatronlite submit` pastes this file into
# the script it renders, so a job needs nothing from launch/ at run time.

# A TCP port nobody on this host listens on, starting from one derived from the job id so that
# jobs sharing a node start from different places.
free_port() {
    local port=$((20000 + ${SLURM_JOB_ID:-0} % 20000))
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        port=$((port + 1))
    done
    echo "$port"
}

# run_preemptible RUN_DIR COMMAND...: run the job step so that a warning signal (USR1 to this batch
# shell: `#SBATCH --signal=B:USR1@SECONDS` before the time limit, or `scancel --signal=USR1 --batch`)
# asks the trainer to save a checkpoint and stop, through the file RUN_DIR/.save_and_exit that every
# node sees. A step that stopped that way (exit code 3, or failed after the request) requeues the
# job, which resumes from the checkpoint (checkpoint.load: auto).
run_preemptible() {
    local run_dir=$1 requested="" pid rc
    shift
    trap 'requested=1; echo "$(date +%T) warning signal: asking the trainer to save and stop"; touch "$run_dir/.save_and_exit"' USR1
    "$@" &
    pid=$!
    wait "$pid"
    rc=$?
    while kill -0 "$pid" 2>/dev/null; do  # `wait` returns early when the trap runs
        wait "$pid"
        rc=$?
    done
    if [[ $rc == 3 || ( -n $requested && $rc != 0 ) ]]; then
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
