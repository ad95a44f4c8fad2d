// The bridge to the Python half of moetrace (analyze, speculate, fetch; python/moetrace).
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

namespace moetrace::cli {

// Replaces the process with `python -m moetrace SUBCOMMAND ARGS...` (Python: $MOETRACE_PYTHON, else
// the repository's .venv, else python3; PYTHONPATH gets the repository's python/). Returns only by
// throwing Error, saying which interpreter could not be started and how to fix it.
[[noreturn]] void run_python_subcommand(const std::string& subcommand,
                                        const std::vector<std::string>& args);

// Adds subcommand `name` whose every argument (--help included) goes to run_python_subcommand.
void add_python_subcommand(CLI::App& app, const std::string& name, const std::string& description);

}  // namespace moetrace::cli
