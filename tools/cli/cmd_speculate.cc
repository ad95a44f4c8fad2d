// `moetrace speculate STORE -o DIR ...`: expert-prediction baselines and the offloading cache
// simulator, in Python (moetrace.speculate); this subcommand hands every argument to it unchanged.
#include <string>
#include <vector>

#include "command.h"
#include "python_bridge.h"

namespace moetrace::cli {

namespace {

RegisterCommand reg([](CLI::App& app) {
  auto* sub = app.add_subcommand(
      "speculate",
      "Expert-prediction baselines and an expert cache simulator over a trace store: "
      "speculation.json + .md (Python, see `moetrace speculate --help`)");
  sub->prefix_command();
  sub->set_help_flag();
  sub->allow_extras();
  sub->callback([sub] { run_python_subcommand("speculate", sub->remaining()); });
});

}  // namespace
}  // namespace moetrace::cli
