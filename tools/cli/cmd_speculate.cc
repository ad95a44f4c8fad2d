// `moetrace speculate STORE -o DIR ...`: expert-prediction baselines and the offloading cache
// simulator, in Python (moetrace.speculate); this subcommand hands every argument to it unchanged.
#include "command.h"
#include "python_bridge.h"

namespace moetrace::cli {

namespace {

RegisterCommand reg([](CLI::App& app) {
  add_python_subcommand(
      app, "speculate",
      "Expert-prediction baselines and an expert cache simulator over a trace store: "
      "speculation.json + .md (Python, see `moetrace speculate --help`)");
});

}  // namespace
}  // namespace moetrace::cli
