#include "collect/launcher.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/log.h"

#ifdef MOETRACE_WITH_MPI
// The C API only: the deprecated C++ bindings do not compile warning-free.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

extern char** environ;

namespace moetrace {

Environment process_environment() {
  Environment env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string kv(*e);
    const size_t eq = kv.find('=');
    if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  return env;
}

std::vector<std::string> process_command_line(const std::vector<std::string>& fallback) {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  const std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in && raw.empty()) return fallback;
  std::vector<std::string> args;
  size_t begin = 0;
  while (begin < raw.size()) {
    const size_t end = std::min(raw.find('\0', begin), raw.size());
    args.push_back(raw.substr(begin, end - begin));
    begin = end + 1;
  }
  return args.empty() ? fallback : args;
}

namespace {

// A non-negative decimal that fits an int, all of it; else Error naming the variable.
int parse_count(const std::string& name, const std::string& value) {
  int64_t v = 0;
  bool ok = !value.empty() && value.size() <= 9;
  for (char c : value) {
    ok = ok && c >= '0' && c <= '9';
    if (ok) v = v * 10 + (c - '0');
  }
  if (!ok) fail(name, "='", value, "': expected a non-negative integer");
  return static_cast<int>(v);
}

// One launcher's variables: rank, size and (optional) local rank.
struct Source {
  const char* label;
  const char* rank;
  const char* size;
  const char* local;
  bool mpi;
};

}  // namespace

LaunchInfo detect_launch(const Environment& env, const LaunchFlags& flags) {
  auto get = [&](const char* name) -> const std::string* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : &it->second;
  };
  LaunchInfo l;
  auto check = [&](const std::string& rank_name, const std::string& size_name) {
    if (l.world_size < 1) fail(size_name, " is ", l.world_size, ": expected at least 1");
    if (l.rank >= l.world_size) {
      fail(rank_name, " is ", l.rank, ", not below ", size_name, " ", l.world_size);
    }
  };
  if (flags.rank.has_value() != flags.world_size.has_value())
    fail("--rank and --world-size go together (give both or neither)");
  if (flags.rank) {
    if (*flags.rank < 0) fail("--rank ", *flags.rank, ": expected a non-negative integer");
    l.rank = *flags.rank;
    l.world_size = *flags.world_size;
    l.local_rank = l.rank;
    l.source = "--rank/--world-size";
    check("--rank", "--world-size");
  } else {
    // The variables of srun outside a step (a bare sbatch script) are ignored: only
    // SLURM_STEP_NUM_TASKS, which srun sets for its tasks, makes Slurm's the launcher.
    const std::vector<Source> sources = {
        {"Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
         true},
        {"MPICH/PMI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", true},
        {"Slurm srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", false},
        {"torchrun-style", "RANK", "WORLD_SIZE", "LOCAL_RANK", false},
    };
    for (const Source& s : sources) {
      const std::string* size = get(s.size);
      if (size == nullptr) continue;
      const std::string* rank = get(s.rank);
      if (rank == nullptr) fail(s.size, " is set but ", s.rank, " is not");
      l.world_size = parse_count(s.size, *size);
      l.rank = parse_count(s.rank, *rank);
      const std::string* local = get(s.local);
      l.local_rank = local != nullptr ? parse_count(s.local, *local) : l.rank;
      l.source = std::string(s.label) + " (" + s.rank + ", " + s.size + ")";
      l.mpi = s.mpi;
      check(s.rank, s.size);
      break;
    }
    if (l.source.empty()) l.source = "single process (no launcher variables)";
  }
  if (flags.local_rank) {
    if (*flags.local_rank < 0)
      fail("--local-rank ", *flags.local_rank, ": expected a non-negative integer");
    l.local_rank = *flags.local_rank;
  }
  return l;
}

int cuda_device_for(const LaunchInfo& l) {
  const int n = visible_cuda_devices();  // none: the engine reports it when it starts
  return n < 1 ? 0 : l.local_rank % n;
}

int default_threads(const LaunchInfo& l, const Environment& env, bool gpu) {
  if (l.world_size <= 1) return 0;
  int per_machine = 0;
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE",
                           "SLURM_NTASKS_PER_NODE"}) {
    auto it = env.find(name);
    if (it != env.end() && std::atoi(it->second.c_str()) > 0) {
      per_machine = std::atoi(it->second.c_str());
      break;
    }
  }
  if (per_machine == 0 && gpu) {
    const int gpus = visible_cuda_devices();
    if (gpus > 0) per_machine = std::min(l.world_size, gpus);
  }
  if (per_machine <= 1) return 0;
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, cores / per_machine);
}

bool built_with_mpi() {
#ifdef MOETRACE_WITH_MPI
  return true;
#else
  return false;
#endif
}

bool mpi_wait_for_all_ranks(const LaunchInfo& l) {
#ifdef MOETRACE_WITH_MPI
  if (!l.mpi || l.world_size < 2) return false;
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized && MPI_Init(nullptr, nullptr) != MPI_SUCCESS) fail("MPI_Init failed");
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size != l.world_size) {
    fail("MPI_COMM_WORLD has ", size, " ranks but the launcher's variables say ", l.world_size);
  }
  if (MPI_Barrier(MPI_COMM_WORLD) != MPI_SUCCESS) fail("MPI_Barrier failed");
  MPI_Finalize();
  return true;
#else
  (void)l;
  return false;
#endif
}

StorePart plan_part(int64_t total, int64_t window, int rank, int world_size) {
  MT_ASSERT(window > 0 && world_size > 0 && rank >= 0 && rank < world_size);
  const int64_t windows = (total + window - 1) / window;
  const int64_t k0 = windows * rank / world_size, k1 = windows * (rank + 1) / world_size;
  StorePart p;
  p.rank = rank;
  p.world_size = world_size;
  // k0 < windows when there are any, so every part, even an empty one, starts a window.
  p.first_sample = k0 * window;
  p.num_samples = std::min(total, k1 * window) - p.first_sample;
  p.total_samples = total;
  return p;
}

void assemble_after_rank(const std::filesystem::path& store, const LaunchInfo& l) {
  const std::string manifest = (store / "manifest.json").string();
  try {
    if (mpi_wait_for_all_ranks(l)) {
      if (l.rank != 0) return;  // rank 0 merges
      const MergeResult r = merge_store(store);
      if (!r.merged) {
        std::string pending;
        for (const auto& p : r.pending) pending += (pending.empty() ? "" : ", ") + p;
        fail("every MPI rank finished, yet ", pending, " is not complete");
      }
      log_info("rank 0 merged the ", l.world_size, " ranks: ", r.num_samples, " samples in ",
               r.num_shards, " shards, ", manifest);
      return;
    }
    const MergeResult r = merge_store(store);
    if (r.merged) {
      log_info("all ", l.world_size, " ranks are complete: ", manifest, " lists ", r.num_samples,
               " samples in ", r.num_shards, " shards");
    } else {
      std::string pending;
      for (const auto& p : r.pending) pending += (pending.empty() ? "" : ", ") + p;
      log_info("rank ", l.rank, " is complete; still running or failed: ", pending,
               ". The last rank to finish writes ", manifest, ", else run `moetrace merge ",
               store.string(), "` once all are done");
    }
  } catch (const Error& e) {
    fail("rank ", l.rank, "'s part is complete, but assembling the store failed: ", e.what());
  }
}

}  // namespace moetrace
