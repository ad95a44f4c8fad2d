// Minimal leveled logging to stderr. Level is process-wide (set by --log-level).
#pragma once

#include <sstream>
#include <string>
#include <string_view>

namespace moetrace {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3, kOff = 4 };

void set_log_level(LogLevel level);
LogLevel log_level();
bool parse_log_level(std::string_view s, LogLevel* out);
const char* log_level_name(LogLevel level);  // "debug", "info", "warn", "error" or "off"
void log_line(LogLevel level, const std::string& msg);

template <class... Parts>
void log(LogLevel level, Parts&&... parts) {
  if (level < log_level()) return;
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  log_line(level, os.str());
}
template <class... P>
void log_info(P&&... p) {
  log(LogLevel::kInfo, std::forward<P>(p)...);
}
template <class... P>
void log_warn(P&&... p) {
  log(LogLevel::kWarn, std::forward<P>(p)...);
}
template <class... P>
void log_debug(P&&... p) {
  log(LogLevel::kDebug, std::forward<P>(p)...);
}

}  // namespace moetrace
