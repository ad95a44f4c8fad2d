// `moetrace analyze STORE [-o DIR] ...`: the analysis is Python (numpy + matplotlib, in the
// moetrace package); this subcommand only finds a Python and replaces itself with
// `python -m moetrace analyze ARGS...`, so arguments, output and the exit code pass through
// unchanged (tools/cli/python_bridge.h).
#include "command.h"
#include "python_bridge.h"

namespace moetrace::cli {

namespace {

// Everything after `analyze` goes to Python untouched, --help included (argparse documents it).
RegisterCommand reg([](CLI::App& app) {
  add_python_subcommand(
      app, "analyze",
      "Expert usage, load balance, router confidence, layer-to-layer and dataset statistics of a "
      "trace store: stats.json + report.html (Python, see `moetrace analyze --help`)");
});

}  // namespace
}  // namespace moetrace::cli
