// One error type for every input, file and config problem. Its message is one line that names the
// file, tensor or row and what was expected; the CLI prints it and exits non-zero.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moetrace {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Concatenates the parts with operator<< and throws Error.
template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  throw Error(os.str());
}

// Internal invariants (not input problems): checked in every build, cheap.
#define MT_ASSERT(cond)                                                                        \
  do {                                                                                         \
    if (!(cond)) ::moetrace::fail("internal error: ", #cond, " at ", __FILE__, ":", __LINE__); \
  } while (0)

}  // namespace moetrace
