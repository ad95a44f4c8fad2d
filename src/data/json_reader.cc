// JSON Lines (one value per line) and JSON arrays (`[{...}, {...}]`, read element by element, never
// whole). The first non-blank byte decides: '[' is an array, anything else JSON Lines.
#include "core/error.h"
#include "data/records.h"

namespace moetrace::data {

namespace {

constexpr int kMaxDepth = 64;

// Nesting depth of a JSON text, ignoring brackets inside strings.
int nesting_depth(const std::string& s) {
  int depth = 0, max_depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      max_depth = std::max(max_depth, ++depth);
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return max_depth;
}

bool is_space(int c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

class JsonReader : public RecordReader {
 public:
  JsonReader(std::unique_ptr<ByteStream> in, std::string name, const ReadOptions& options)
      : RecordReader(std::move(name), options.max_logged), in_(std::move(in)), options_(options) {
    in_.skip_bom();
    while (is_space(in_.peek())) in_.get();
    if (in_.peek() == '[') {
      in_.get();
      array_ = true;
    }
  }

  bool next(Record* out) override {
    std::string text;
    bool oversize = false;
    while (true) {
      if (array_ ? !next_element(&text, &oversize) : !next_line(&text, &oversize)) return false;
      const int64_t row = row_++;
      if (oversize) {
        skip(row, "too large");
        continue;
      }
      if (!valid_utf8(text)) {
        skip(row, "invalid UTF-8");
        continue;
      }
      if (nesting_depth(text) > kMaxDepth) {
        skip(row, "nested too deeply");
        continue;
      }
      nlohmann::json value = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
      if (value.is_discarded()) {
        skip(row, "invalid JSON");
        continue;
      }
      if (value.is_string()) {
        value = nlohmann::json{{"text", value.get<std::string>()}};
      } else if (!value.is_object()) {
        skip(row, "not a JSON object");
        continue;
      }
      out->row = row;
      out->fields = std::move(value);
      ++counters_.rows;
      return true;
    }
  }

 private:
  // The next non-blank line (without its line end).
  bool next_line(std::string* line, bool* oversize) {
    while (true) {
      line->clear();
      *oversize = false;
      int c = in_.get();
      if (c < 0) return false;
      size_t bytes = 0;
      bool blank = true;
      for (; c >= 0 && c != '\n'; c = in_.get()) {
        if (++bytes > options_.max_record_bytes) {
          *oversize = true;
          continue;
        }
        if (!is_space(c)) blank = false;
        *line += static_cast<char>(c);
      }
      if (!blank || *oversize) return true;
    }
  }

  // The text of the next top-level array element; false after the closing ']' or at the end.
  bool next_element(std::string* text, bool* oversize) {
    text->clear();
    *oversize = false;
    if (array_done_) return false;
    int c;
    while ((c = in_.peek()) >= 0 && (is_space(c) || c == ',')) in_.get();
    if (c < 0) {
      if (!array_done_) skip(row_, "JSON array not closed");
      array_done_ = true;
      return false;
    }
    if (c == ']') {
      in_.get();
      array_done_ = true;
      return false;
    }
    int depth = 0;
    bool in_string = false;
    size_t bytes = 0;
    while ((c = in_.peek()) >= 0) {
      if (!in_string && depth == 0 && (c == ',' || c == ']')) break;
      in_.get();
      if (++bytes > options_.max_record_bytes) {
        *oversize = true;
      } else {
        *text += static_cast<char>(c);
      }
      if (in_string) {
        if (c == '\\') {
          int e = in_.get();
          if (e < 0) break;
          ++bytes;
          if (!*oversize) *text += static_cast<char>(e);
        } else if (c == '"') {
          in_string = false;
        }
      } else if (c == '"') {
        in_string = true;
      } else if (c == '{' || c == '[') {
        ++depth;
      } else if (c == '}' || c == ']') {
        --depth;
      }
    }
    return true;
  }

  BufferedInput in_;
  ReadOptions options_;
  bool array_ = false;
  bool array_done_ = false;
  int64_t row_ = 0;
};

}  // namespace

std::unique_ptr<RecordReader> make_json_reader(std::unique_ptr<ByteStream> in, std::string name,
                                               const ReadOptions& options) {
  return std::make_unique<JsonReader>(std::move(in), std::move(name), options);
}

}  // namespace moetrace::data
