// Each subcommand lives in its own cmd_<name>.cc: it registers a function that adds a CLI11
// subcommand, fills an options struct and calls the library. main.cc turns moetrace::Error into a
// one-line message and a non-zero exit.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <vector>

namespace moetrace::cli {

using CommandSetup = std::function<void(CLI::App& app)>;

std::vector<CommandSetup>& command_registry();

struct RegisterCommand {
  explicit RegisterCommand(CommandSetup setup) { command_registry().push_back(std::move(setup)); }
};

}  // namespace moetrace::cli
