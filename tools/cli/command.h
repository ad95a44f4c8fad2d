// Each subcommand lives in its own cmd_<name>.cc: it registers a function that adds a CLI11
// subcommand, fills an options struct and calls the library. main.cc turns moetrace::Error into a
// one-line message and a non-zero exit.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

namespace moetrace::cli {

using CommandSetup = std::function<void(CLI::App& app)>;

std::vector<CommandSetup>& command_registry();

// What `moetrace --version` prints (version.cc).
std::string version_text();

// Whether a subcommand draws a progress bar on stderr: only on a terminal, not under --no-progress
// and not under -q / --log-level above info.
bool progress_wanted(bool no_progress);

// A trace store named by its directory or its manifest.json: the directory.
std::string store_dir_of(const std::string& target);

// The name in `names` closest to `word` when it looks like a typo of it (at most 2 edits), else "".
std::string closest_name(const std::string& word, const std::vector<std::string>& names);

struct RegisterCommand {
  explicit RegisterCommand(CommandSetup setup) { command_registry().push_back(std::move(setup)); }
};

}  // namespace moetrace::cli
