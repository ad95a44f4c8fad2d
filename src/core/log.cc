#include "core/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

namespace moetrace {

namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::mutex g_mu;
constexpr const char* kNames[] = {"debug", "info", "warn", "error", "off"};

// "2026-11-28 07:30:12", local time to the second: every log line starts with it.
std::string log_timestamp(std::chrono::system_clock::time_point t) {
  const std::time_t secs = std::chrono::system_clock::to_time_t(t);
  std::tm tm{};
  localtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}
}  // namespace

void set_log_level(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load()); }

bool parse_log_level(std::string_view s, LogLevel* out) {
  for (int i = 0; i < 5; ++i) {
    if (s == kNames[i]) {
      *out = static_cast<LogLevel>(i);
      return true;
    }
  }
  return false;
}

const char* log_level_name(LogLevel level) { return kNames[static_cast<int>(level)]; }

void log_line(LogLevel level, const std::string& msg) {
  const std::string when = log_timestamp(std::chrono::system_clock::now());
  std::lock_guard<std::mutex> lock(g_mu);
  std::fprintf(stderr, "%s [moetrace %s] %s\n", when.c_str(), kNames[static_cast<int>(level)],
               msg.c_str());
}

}  // namespace moetrace
