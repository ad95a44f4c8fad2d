#include "collect/launcher.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <thread>

#include "core/error.h"

namespace moetrace {
namespace {

LaunchInfo detect(const Environment& env, LaunchFlags flags = {}) {
  return detect_launch(env, flags);
}

// The message of the Error that detect() throws ("" when it does not).
std::string error_of(const Environment& env, LaunchFlags flags = {}) {
  try {
    detect(env, flags);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Launcher, NoVariablesIsOneProcess) {
  const LaunchInfo l = detect({{"HOME", "/root"}, {"SLURM_JOB_ID", "3"}});
  EXPECT_EQ(l.rank, 0);
  EXPECT_EQ(l.world_size, 1);
  EXPECT_EQ(l.local_rank, 0);
  EXPECT_FALSE(l.mpi);
  EXPECT_NE(l.source.find("single process"), std::string::npos);
}

TEST(Launcher, OpenMpi) {
  const LaunchInfo l = detect({{"OMPI_COMM_WORLD_RANK", "5"},
                               {"OMPI_COMM_WORLD_SIZE", "8"},
                               {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}});
  EXPECT_EQ(l.rank, 5);
  EXPECT_EQ(l.world_size, 8);
  EXPECT_EQ(l.local_rank, 1);
  EXPECT_TRUE(l.mpi);
  EXPECT_NE(l.source.find("Open MPI"), std::string::npos);
}

TEST(Launcher, MpichPmiWithoutLocalRankUsesTheRank) {
  const LaunchInfo l = detect({{"PMI_RANK", "2"}, {"PMI_SIZE", "3"}});
  EXPECT_EQ(l.rank, 2);
  EXPECT_EQ(l.world_size, 3);
  EXPECT_EQ(l.local_rank, 2);
  EXPECT_TRUE(l.mpi);
  EXPECT_EQ(detect({{"PMI_RANK", "2"}, {"PMI_SIZE", "3"}, {"MPI_LOCALRANKID", "0"}}).local_rank, 0);
}

TEST(Launcher, SlurmOnlyInsideAnSrunStep) {
  // A batch script: the job's variables only.
  const LaunchInfo batch =
      detect({{"SLURM_JOB_ID", "9"}, {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}});
  EXPECT_EQ(batch.world_size, 1);
  // srun's tasks.
  const LaunchInfo l = detect({{"SLURM_JOB_ID", "9"},
                               {"SLURM_NTASKS", "4"},
                               {"SLURM_PROCID", "3"},
                               {"SLURM_STEP_NUM_TASKS", "4"},
                               {"SLURM_LOCALID", "1"}});
  EXPECT_EQ(l.rank, 3);
  EXPECT_EQ(l.world_size, 4);
  EXPECT_EQ(l.local_rank, 1);
  EXPECT_FALSE(l.mpi);
  EXPECT_NE(l.source.find("Slurm srun"), std::string::npos);
}

TEST(Launcher, TorchrunStyle) {
  const LaunchInfo l = detect({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}});
  EXPECT_EQ(l.rank, 1);
  EXPECT_EQ(l.world_size, 2);
  EXPECT_EQ(l.local_rank, 1);
  EXPECT_NE(l.source.find("torchrun"), std::string::npos);
}

TEST(Launcher, MpiVariablesComeBeforeSlurmAndTorchrun) {
  // mpirun inside an allocation: srun started its daemons, one per node.
  const LaunchInfo l = detect({{"OMPI_COMM_WORLD_RANK", "6"},
                               {"OMPI_COMM_WORLD_SIZE", "8"},
                               {"SLURM_PROCID", "1"},
                               {"SLURM_STEP_NUM_TASKS", "2"},
                               {"RANK", "0"},
                               {"WORLD_SIZE", "1"}});
  EXPECT_EQ(l.rank, 6);
  EXPECT_EQ(l.world_size, 8);
}

TEST(Launcher, ExplicitFlagsWin) {
  LaunchFlags f;
  f.rank = 2;
  f.world_size = 4;
  const LaunchInfo l = detect({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "8"}}, f);
  EXPECT_EQ(l.rank, 2);
  EXPECT_EQ(l.world_size, 4);
  EXPECT_EQ(l.local_rank, 2);
  EXPECT_FALSE(l.mpi);
  f.local_rank = 0;
  EXPECT_EQ(detect({}, f).local_rank, 0);
  LaunchFlags only_local;
  only_local.local_rank = 3;
  EXPECT_EQ(
      detect({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}}, only_local).local_rank, 3);
}

TEST(Launcher, InconsistentValuesNameTheVariable) {
  EXPECT_NE(error_of({{"OMPI_COMM_WORLD_RANK", "4"}, {"OMPI_COMM_WORLD_SIZE", "4"}})
                .find("OMPI_COMM_WORLD_RANK is 4, not below OMPI_COMM_WORLD_SIZE 4"),
            std::string::npos);
  EXPECT_NE(error_of({{"OMPI_COMM_WORLD_SIZE", "4"}}).find("OMPI_COMM_WORLD_RANK is not"),
            std::string::npos);
  EXPECT_NE(error_of({{"PMI_RANK", "1"}, {"PMI_SIZE", "two"}}).find("PMI_SIZE='two'"),
            std::string::npos);
  EXPECT_NE(error_of({{"SLURM_PROCID", "-1"}, {"SLURM_STEP_NUM_TASKS", "2"}}).find("SLURM_PROCID"),
            std::string::npos);
  EXPECT_NE(error_of({{"RANK", "0"}, {"WORLD_SIZE", "0"}}).find("WORLD_SIZE is 0"),
            std::string::npos);
  EXPECT_NE(
      error_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1x"}}).find("LOCAL_RANK='1x'"),
      std::string::npos);
  EXPECT_NE(error_of({{"RANK", "99999999999"}, {"WORLD_SIZE", "2"}}).find("RANK="),
            std::string::npos);
  LaunchFlags f;
  f.rank = 1;
  EXPECT_NE(error_of({}, f).find("--rank and --world-size go together"), std::string::npos);
  f.world_size = 1;
  EXPECT_NE(error_of({}, f).find("--rank is 1, not below --world-size 1"), std::string::npos);
  f.rank = -1;
  EXPECT_NE(error_of({}, f).find("--rank -1"), std::string::npos);
}

TEST(PlanPart, WholeWindowsTileThePlan) {
  for (int64_t window : {16, 48}) {
    for (int64_t total : {0, 1, 15, 16, 17, 100, 1000}) {
      for (int world : {1, 2, 3, 7}) {
        int64_t next = 0;
        for (int r = 0; r < world; ++r) {
          const StorePart p = plan_part(total, window, r, world);
          const std::string what = std::to_string(window) + " " + std::to_string(total) + " " +
                                   std::to_string(world) + " " + std::to_string(r);
          EXPECT_EQ(p.rank, r);
          EXPECT_EQ(p.world_size, world);
          EXPECT_EQ(p.total_samples, total);
          EXPECT_EQ(p.first_sample % window, 0) << what;
          if (p.num_samples > 0) {
            EXPECT_EQ(p.first_sample, next) << what;
          }
          // Every part but the last ends at a window boundary: its batches are one process's.
          if (p.first_sample + p.num_samples < total) {
            EXPECT_EQ(p.num_samples % window, 0) << what;
          }
          EXPECT_GE(p.num_samples, 0);
          next += p.num_samples;
        }
        EXPECT_EQ(next, total) << window << " " << total << " " << world;
      }
    }
  }
  // 100 samples in windows of 48 (three shards of 16): 3 windows, one per rank.
  EXPECT_EQ(plan_part(100, 48, 1, 3).first_sample, 48);
  EXPECT_EQ(plan_part(100, 48, 2, 3).num_samples, 4);
  // 100 samples = 7 shards over 3 ranks: 2, 2 and 3 shards.
  EXPECT_EQ(plan_part(100, 16, 0, 3).num_samples, 32);
  EXPECT_EQ(plan_part(100, 16, 1, 3).first_sample, 32);
  EXPECT_EQ(plan_part(100, 16, 2, 3).first_sample, 64);
  EXPECT_EQ(plan_part(100, 16, 2, 3).num_samples, 36);
  // Fewer shards than ranks: some ranks get none.
  EXPECT_EQ(plan_part(10, 16, 0, 3).num_samples, 0);
  EXPECT_EQ(plan_part(10, 16, 2, 3).num_samples, 10);
}

TEST(Launcher, RanksOnOneMachineShareItsCores) {
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  LaunchInfo single;
  EXPECT_EQ(default_threads(single, {{"LOCAL_WORLD_SIZE", "4"}}, false), 0);  // all cores
  LaunchInfo l;
  l.rank = 1;
  l.world_size = 8;
  EXPECT_EQ(default_threads(l, {{"LOCAL_WORLD_SIZE", "4"}}, false), std::max(1, cores / 4));
  EXPECT_EQ(default_threads(l, {{"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}}, false),
            std::max(1, cores / 2));
  EXPECT_EQ(default_threads(l, {{"LOCAL_WORLD_SIZE", "1"}}, false), 0);  // alone on its machine
  EXPECT_EQ(default_threads(l, {}, false), 0);  // unknown: the user decides (--threads)
}

}  // namespace
}  // namespace moetrace
