# The one file to edit for your cluster: sourced by every slurm/*.sbatch script (and usable by hand:
# `source slurm/env.sh`) to set up the software environment on the compute nodes.
#
# Variables read here:
#   NBP_VENV   the Python virtual environment to activate (default: this repository's .venv)
#   NBP_CPU=1  run on CPU: DeepSpeed's accelerator is forced to cpu and torch.distributed uses gloo
#              (for smoke tests on nodes without GPUs; the test suite's local Slurm cluster sets it)
#   TORCH_EXTENSIONS_DIR  where DeepSpeed's compiled ops go (default in a job: node-local, per job; see below)

NBP_ROOT="${NBP_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export NBP_ROOT

# ---- modules -----------------------------------------------------------------------------------
# Clusters with environment modules: load the toolchain the venv was built against *before*
# activating it, so the venv's torch finds the same CUDA / NCCL libraries at run time.
# module purge
# module load cuda/12.4
# module load nccl/2.21
# module load gcc/12

# ---- Python ------------------------------------------------------------------------------------
NBP_VENV="${NBP_VENV:-$NBP_ROOT/.venv}"
if [[ -f "$NBP_VENV/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$NBP_VENV/bin/activate"
else
    echo "slurm/env.sh: no virtual environment at $NBP_VENV (set NBP_VENV, or run 'make setup')" >&2
    return 1 2>/dev/null || exit 1
fi
# the scripts run from the submission folder, not the repository: make `nbp_ds` importable anyway
export PYTHONPATH="$NBP_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ---- threads -----------------------------------------------------------------------------------
# Without a cap, every rank's torch / OpenMP starts one thread per core of the node and the ranks
# sharing it fight over them. In a job: the cores Slurm gave each task (--cpus-per-task), whatever the
# submitting shell held (sbatch passes its environment on); outside one: OMP_NUM_THREADS if set, else 4.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"
else
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
fi

# ---- DeepSpeed ops -------------------------------------------------------------------------------
# DeepSpeed compiles some of its ops with the node's C++ compiler (nvcc too for CUDA ones) the first time a run
# needs them: CPUAdam for zero3_offload, FusedAdam for a JSON that asks for it (the shipped zero2/zero3 use
# torch's fused AdamW, which compiles nothing; nbp_ds skips DeepSpeed's CPU shared-memory all-reduce, which
# training never calls). Left to the default (~/.cache/torch_extensions, on shared storage at most sites), every
# rank of every node would build into one folder over the network file system at once. So each job builds in
# node-local temporary space, a folder per job and restart ($SLURM_TMPDIR, else $TMPDIR, else /tmp): torch's
# build lock, a file in that folder, lets one rank per node compile while the node's other ranks wait, and a
# build killed midway leaves no lock behind for later jobs. train.sbatch removes the folder on every node when
# its training step ends. A TORCH_EXTENSIONS_DIR set before this point is kept (see "DeepSpeed ops" in
# slurm/README.md): a node-local folder that outlives jobs saves the compile in every job.
# export TORCH_EXTENSIONS_DIR="/local/scratch/$USER/nbp_ds-ops"
if [[ -n "${SLURM_JOB_ID:-}" && -z "${TORCH_EXTENSIONS_DIR:-}" ]]; then
    TORCH_EXTENSIONS_DIR="${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/nbp_ds-ops-job${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
    export TORCH_EXTENSIONS_DIR
    export NBP_JOB_OPS_DIR="$TORCH_EXTENSIONS_DIR"  # this job's own: train.sbatch removes it at the end
fi

# ---- NCCL (multi-node GPU communication) -------------------------------------------------------
# The defaults work on most InfiniBand clusters; uncomment what yours needs.
#
# Which network interface carries NCCL's bootstrap and, without InfiniBand, its traffic. Needed
# when nodes have several interfaces and NCCL picks one the other nodes cannot reach (docker0,
# a management network): name the high-speed one, or exclude with a caret ("^docker0,lo").
# export NCCL_SOCKET_IFNAME=ib0
#
# The same for gloo (CPU runs, NBP_CPU=1). Unset, the trainer picks the interface that routes to
# the job's other nodes (and logs it); set it to choose yourself.
# export GLOO_SOCKET_IFNAME=eth0
#
# Set to 1 on clusters without a working InfiniBand / RoCE fabric, so NCCL falls back to TCP
# sockets instead of failing (or hanging) while initialising IB verbs.
# export NCCL_IB_DISABLE=1
#
# Make a rank that waits on a collective whose peer died raise an error instead of hanging until
# the job's time limit, so srun --kill-on-bad-exit ends the whole job and it can be requeued.
# PyTorch >= 2.2 reads TORCH_NCCL_ASYNC_ERROR_HANDLING; older versions read the NCCL_ name.
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# export NCCL_ASYNC_ERROR_HANDLING=1
#
# What NCCL reports: WARN (default) or INFO, which prints the chosen interfaces, transports (IB,
# NVLink, sockets) and ring / tree topology at start-up: the first thing to look at when the
# first collective hangs or bandwidth is low. INFO is verbose (a few lines per rank).
# export NCCL_DEBUG=INFO

# ---- CPU runs ----------------------------------------------------------------------------------
if [[ "${NBP_CPU:-0}" == 1 ]]; then
    # DeepSpeed otherwise probes for CUDA and refuses to start without it
    export DS_ACCELERATOR=cpu
fi
