#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <functional>

#include "command.h"
#include "core/error.h"
#include "core/log.h"

namespace moetrace::cli {
std::vector<CommandSetup>& command_registry() {
  static std::vector<CommandSetup> registry;
  return registry;
}

bool progress_wanted(bool no_progress) {
  return !no_progress && log_level() <= LogLevel::kInfo && ::isatty(STDERR_FILENO) == 1;
}

std::string store_dir_of(const std::string& target) {
  const std::filesystem::path p(target);
  std::error_code ec;
  if (p.filename() == "manifest.json" && std::filesystem::is_regular_file(p, ec))
    return p.parent_path().empty() ? "." : p.parent_path().string();
  return target;
}

namespace {

// Edit distance with adjacent transpositions counting 1 ("colect" -> "collect": 1).
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

// The first argument that is not an option (nor the value of the top-level --log-level): the
// subcommand the user meant.
std::string first_word(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--log-level") {
      ++i;
    } else if (a.empty() || a[0] != '-') {
      return a;
    }
  }
  return {};
}

}  // namespace

std::string closest_name(const std::string& word, const std::vector<std::string>& names) {
  std::string best;
  size_t best_d = 0;
  for (const auto& n : names) {
    const size_t d = edit_distance(word, n);
    if (best.empty() || d < best_d) {
      best = n;
      best_d = d;
    }
  }
  // Close enough to be a typo: at most 2 edits, and fewer than half the word.
  return !best.empty() && best_d <= 2 && 2 * best_d < std::max(word.size(), best.size()) ? best
                                                                                         : "";
}

}  // namespace moetrace::cli

int main(int argc, char** argv) {
  using moetrace::cli::closest_name;
  CLI::App app{"moetrace: exact Mixture-of-Experts routing traces of Switch Transformers"};
  app.require_subcommand(1);
  app.set_version_flag("--version", moetrace::cli::version_text);
  // -q and --log-level belong to every subcommand too, before or after its name
  // (`moetrace -q inspect X` = `moetrace inspect X -q`); after the name wins over before, and an
  // explicit --log-level over -q.
  std::string level;
  bool quiet = false;
  const char* level_help = "debug, info, warn, error or off (default info)";
  const char* quiet_help = "warnings and errors only (= --log-level warn)";
  app.add_option("--log-level", level, level_help);
  app.add_flag("-q,--quiet", quiet, quiet_help);
  app.parse_complete_callback([&] {
    moetrace::LogLevel l = quiet ? moetrace::LogLevel::kWarn : moetrace::LogLevel::kInfo;
    if (!level.empty() && !moetrace::parse_log_level(level, &l)) {
      moetrace::fail("--log-level '", level, "': expected debug, info, warn, error or off");
    }
    moetrace::set_log_level(l);
  });
  for (auto& setup : moetrace::cli::command_registry()) setup(app);
  // Every subcommand, nested ones (`datasets list`) included.
  std::function<void(CLI::App*)> add_log_options = [&](CLI::App* parent) {
    for (CLI::App* sub : parent->get_subcommands([](CLI::App*) { return true; })) {
      if (sub->get_prefix_command()) continue;  // Python subcommands parse their own arguments
      if (sub->get_option_no_throw("--log-level") == nullptr)
        sub->add_option("--log-level", level, level_help)->group("Logging");
      if (sub->get_option_no_throw("-q") == nullptr)
        sub->add_flag("-q,--quiet", quiet, quiet_help)->group("Logging");
      add_log_options(sub);
    }
  };
  add_log_options(&app);
  std::vector<std::string> names;
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; }))
    names.push_back(sub->get_name());
  // A mistyped subcommand: name the closest one instead of CLI11's "not expected".
  const std::string word = moetrace::cli::first_word(argc, argv);
  if (!word.empty() && std::find(names.begin(), names.end(), word) == names.end()) {
    const std::string near = closest_name(word, names);
    std::fprintf(stderr, "moetrace: error: unknown command '%s'%s (see moetrace --help)\n",
                 word.c_str(), near.empty() ? "" : ("; did you mean '" + near + "'?").c_str());
    return 2;
  }
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
