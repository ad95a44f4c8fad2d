#include <cstdio>
#include <exception>

#include "command.h"
#include "core/error.h"
#include "core/log.h"

namespace moetrace::cli {
std::vector<CommandSetup>& command_registry() {
  static std::vector<CommandSetup> registry;
  return registry;
}
}  // namespace moetrace::cli

int main(int argc, char** argv) {
  CLI::App app{"moetrace: exact Mixture-of-Experts routing traces of Switch Transformers"};
  app.require_subcommand(1);
  app.set_version_flag("--version", MOETRACE_VERSION);
  std::string level = "info";
  app.add_option("--log-level", level, "debug, info, warn, error or off")->capture_default_str();
  app.parse_complete_callback([&] {
    moetrace::LogLevel l;
    if (!moetrace::parse_log_level(level, &l))
      throw CLI::ValidationError("--log-level", "unknown level " + level);
    moetrace::set_log_level(l);
  });
  for (auto& setup : moetrace::cli::command_registry()) setup(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moetrace::Error& e) {
    std::fprintf(stderr, "moetrace: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moetrace: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
