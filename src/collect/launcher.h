// Which process of a data-parallel collection this is (docs/SCALING.md): rank, world size and local
// rank from explicit flags or from the launcher's environment (mpirun/mpiexec, srun, torchrun).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "engine/device.h"
#include "trace/store.h"

namespace moetrace {

struct LaunchInfo {
  int rank = 0, world_size = 1;
  int local_rank = 0;  // index among the ranks of this machine: picks the GPU
  std::string source;  // what decided, e.g. "Slurm srun (SLURM_PROCID, SLURM_STEP_NUM_TASKS)"
  bool mpi = false;    // started by an MPI launcher (Open MPI or MPICH/Hydra variables)
};

// --rank/--world-size/--local-rank as given on the command line.
struct LaunchFlags {
  std::optional<int> rank, world_size, local_rank;
};

using Environment = std::map<std::string, std::string>;
Environment process_environment();
// This process's argv as it was started (/proc/self/cmdline), e.g. {"moetrace", "collect", "-t",
// "100"}; `fallback` where it cannot be read.
std::vector<std::string> process_command_line(const std::vector<std::string>& fallback);

// The first that applies: explicit --rank and --world-size (both or neither); Open MPI
// (OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK); MPICH/Hydra or Intel MPI (PMI_RANK/PMI_SIZE,
// MPI_LOCALRANKID); Slurm inside an srun step only (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
// SLURM_LOCALID: a batch script without srun also carries SLURM_PROCID=0 and SLURM_NTASKS, which
// would make one process collect a fraction of the plan); torchrun-style RANK/WORLD_SIZE/
// LOCAL_RANK; else a single process. A launcher that gives no local rank leaves it equal to the
// rank; --local-rank overrides any. Non-numbers, a rank outside [0, world size) or a size without
// its rank throw Error naming the variable.
LaunchInfo detect_launch(const Environment& env, const LaunchFlags& flags);

// The GPU of this rank: local_rank modulo the visible devices (0 without the CUDA backend or GPUs).
int cuda_device_for(const LaunchInfo& l);
// CPU threads for this process when the user gave none (0): the machine's cores shared among the
// ranks on it, from OMPI_COMM_WORLD_LOCAL_SIZE, MPI_LOCALNRANKS, LOCAL_WORLD_SIZE (torchrun) or
// SLURM_NTASKS_PER_NODE, else, for GPU ranks, one rank per visible GPU. 0 (all cores) for a single
// process.
int default_threads(const LaunchInfo& l, const Environment& env, bool gpu);

// Built with MPI (MOETRACE_MPI) and started by an MPI launcher: initialises MPI, waits until every
// rank has called it (MPI_Barrier), finalises, and returns true. Otherwise returns false at once.
bool mpi_wait_for_all_ranks(const LaunchInfo& l);
// Whether this moetrace was built with MPI.
bool built_with_mpi();

// Rank `rank` of `world_size`'s share of a plan of `total` samples: a contiguous block of whole
// batching windows of `window` samples (a multiple of samples_per_shard; ranks take
// floor(N·r/W) .. floor(N·(r+1)/W) of the N = ceil(total / window) windows), so that its batches,
// and so its shards, are byte for byte those of a single process and the merged store keeps the
// single-process sample order. Ranks differ by one window at most; with fewer windows than ranks
// some get none.
StorePart plan_part(int64_t total, int64_t window, int rank, int world_size);

// After rank l.rank committed its part: under MPI (built with it and launched by mpirun) waits for
// every rank and lets rank 0 merge; otherwise tries merge_store() at once, which succeeds for the
// last rank to finish, and logs which ranks are still running when it does not. A failed merge
// throws Error saying that this rank's part is complete.
void assemble_after_rank(const std::filesystem::path& store, const LaunchInfo& l);

}  // namespace moetrace
