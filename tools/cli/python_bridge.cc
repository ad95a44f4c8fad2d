// The bridge to the Python half of moetrace (analyze, speculate, fetch): finds a Python and
// replaces this process with `python -m moetrace SUBCOMMAND ARGS...`, so arguments, output and the
// exit code pass through unchanged.
#include "python_bridge.h"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "core/error.h"
#include "core/log.h"

namespace moetrace::cli {

namespace fs = std::filesystem;

namespace {

// The repository root: the first ancestor of the executable's directory that holds
// python/moetrace (build/tools/cli/moetrace -> ../../..). Empty when not found (installed
// elsewhere).
fs::path find_source_root() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return {};
  for (fs::path dir = exe.parent_path(); !dir.empty(); dir = dir.parent_path()) {
    if (fs::is_directory(dir / "python" / "moetrace", ec)) return dir;
    if (dir == dir.root_path()) break;
  }
  return {};
}

// $MOETRACE_PYTHON, else the repository's .venv, else python3 from PATH.
std::string find_python(const fs::path& root) {
  if (const char* env = std::getenv("MOETRACE_PYTHON"); env != nullptr && *env != '\0') return env;
  std::error_code ec;
  if (!root.empty()) {
    const fs::path venv = root / ".venv" / "bin" / "python";
    if (fs::exists(venv, ec)) return venv.string();
  }
  return "python3";
}

// Run by the interpreter: checks the subcommand's dependencies first so that a missing one gives
// one clear line (not a traceback), then runs it like `python -m moetrace` would. fetch needs only
// huggingface_hub: its module is run by path, without the package's __init__ (numpy).
constexpr const char* kBootstrap = R"PY(
import sys
cmd = sys.argv[1]
needs, hint = (("huggingface_hub",), "pip install huggingface_hub") if cmd == "fetch" else \
    (("numpy", "matplotlib"), "run scripts/setup.sh")
try:
    for name in needs:
        __import__(name)
except ImportError as e:
    sys.stderr.write("moetrace: error: %s needs %s in %s (%s); %s or set MOETRACE_PYTHON to a Python "
                     "that has %s\n" % (cmd, " and ".join(needs), sys.executable, e, hint,
                                         "it" if len(needs) == 1 else "them"))
    sys.exit(1)
import importlib.util, os, runpy
sys.argv = ["moetrace"] + sys.argv[1:]
if cmd == "fetch":
    spec = importlib.util.find_spec("moetrace")
    path = os.path.join(list(spec.submodule_search_locations)[0], "fetch.py") if spec else ""
    if not os.path.isfile(path):
        sys.stderr.write("moetrace: error: the fetch subcommand is not available in this version "
                         "(moetrace/fetch.py is missing)\n")
        sys.exit(2)
    sys.argv = ["moetrace fetch"] + sys.argv[2:]
    runpy.run_path(path, run_name="__main__")
elif importlib.util.find_spec("moetrace.__main__") is not None:
    runpy.run_module("moetrace", run_name="__main__", alter_sys=True)
else:
    import importlib
    mod = importlib.import_module({"analyze": "moetrace.analysis", "speculate": "moetrace.speculate"}[cmd])
    sys.exit(mod.main(sys.argv[2:]))
)PY";

}  // namespace

// Replaces the process with the Python implementation of `subcommand`; returns only on failure
// (throws Error saying which interpreter could not be started and how to fix it).
[[noreturn]] void run_python_subcommand(const std::string& subcommand,
                                        const std::vector<std::string>& args) {
  const fs::path root = find_source_root();
  // `moetrace speculate` runs `$MOETRACE_EXE routers` to get router weights for its pregate
  // predictor.
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) setenv("MOETRACE_EXE", exe.c_str(), 1);
  const std::string python = find_python(root);
  if (!root.empty()) {
    std::string path = (root / "python").string();
    if (const char* old = std::getenv("PYTHONPATH"); old != nullptr && *old != '\0') {
      path += ":";
      path += old;
    }
    setenv("PYTHONPATH", path.c_str(), 1);
  }
  std::vector<std::string> argv_s = {python, "-c", kBootstrap, subcommand};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  execvp(python.c_str(), argv.data());
  fail("cannot run '", python, "' for `moetrace ", subcommand, "` (", std::strerror(errno),
       "); run scripts/setup.sh or set MOETRACE_PYTHON to a Python with ",
       subcommand == "fetch" ? "huggingface_hub" : "numpy and matplotlib");
}

void add_python_subcommand(CLI::App& app, const std::string& name, const std::string& description) {
  CLI::App* sub = app.add_subcommand(name, description);
  sub->prefix_command();
  sub->set_help_flag();
  sub->allow_extras();
  sub->callback([sub, name] {
    // A -q / --log-level given before the name (`moetrace -q analyze X`) reaches Python through the
    // environment (python/moetrace/logopts.py); one after the name is Python's own option and wins.
    setenv("MOETRACE_LOG_LEVEL", log_level_name(log_level()), 1);
    run_python_subcommand(name, sub->remaining());
  });
}

}  // namespace moetrace::cli
