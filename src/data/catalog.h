// The dataset catalog: which Hugging Face datasets moetrace samples, where their text is and how it
// becomes a prompt. The built-in list is the data file assets/catalog/datasets.json (documented in
// docs/DATASETS.md); a user's spec file of the same schema adds or replaces entries at run time.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "data/records.h"

namespace moetrace::data {

// One placeholder of a template: `{name}` takes the first candidate present in the record. A
// candidate is a column path ("passages.passage_text": into structs, mapped over lists) or several
// joined with " + " ("title + description"). `{name?}` may be missing or empty.
struct FieldSpec {
  std::string name;
  std::vector<std::string> candidates;
};

struct DatasetSpec {
  std::string name;      // unique, e.g. "glue/mrpc"
  std::string hub;       // Hub repo id, e.g. "nyu-mll/glue"
  std::string config;    // "" when the dataset has a single unnamed config
  std::string split;     // e.g. "validation"
  std::string category;  // e.g. "glue"; also a group name
  std::string prompt;    // template, e.g. "mrpc sentence1: {sentence1} sentence2: {sentence2}"
  int64_t quota = 100;   // samples planned at most
  std::vector<FieldSpec> fields;
  std::vector<std::string> groups;  // extra groups besides the category and "maximum"
  size_t min_chars = 0;             // the dataset's own floor on the filled-in text length
  // How to read local files of other layouts (original CSV without header, text files).
  Header header = Header::kAuto;
  std::vector<std::string> columns;
  TextMode text_mode = TextMode::kLines;
  char text_delimiter = 0;
  Encoding encoding = Encoding::kUtf8;
  // The publisher's own files of the catalog split, relative to the repo folder (e.g.
  // "Sentences_AllAgree.txt"), tried after the Hub layouts; never with `..` or absolute.
  std::vector<std::string> files;
  // A user's file or folder given to --datasets (see selection.h); empty for catalog entries.
  std::filesystem::path local_path;

  // "<hub name without org>/<config or default>/<split>": the prefix of this dataset's sample ids.
  std::string id_prefix() const;
  // Every top-level column any field candidate names (Parquet projection, CSV header detection).
  std::vector<std::string> column_names() const;
  const FieldSpec* field(std::string_view name) const;
  ReadOptions read_options() const;
  // This dataset read from another split (--split): "" or "catalog" keep the catalog's, as does a
  // split the catalog's refines (validation -> validation_matched). The publisher's `files` name
  // the catalog split and are dropped with it.
  DatasetSpec with_split(const std::string& split) const;
};

class Catalog {
 public:
  // Error naming the file and entry when the file is unreadable or an entry is invalid.
  static Catalog load(const std::filesystem::path& path);
  static Catalog from_json(const nlohmann::json& doc, const std::string& source);
  // assets/catalog/datasets.json.
  static Catalog builtin();

  // Entries of `extra` replace same-named ones, others are appended.
  void merge(const Catalog& extra);
  const std::vector<DatasetSpec>& datasets() const { return datasets_; }
  const DatasetSpec* find(std::string_view name) const;
  // "core", "maximum" (everything), any category or group, dataset names; comma-separated.
  // Catalog order, no duplicates; Error on an unknown name.
  std::vector<const DatasetSpec*> select(const std::string& selection) const;
  // Whether one token of a selection names a dataset or group of this catalog.
  bool knows(std::string_view token) const;
  std::vector<std::string> group_names() const;

 private:
  void validate(const std::string& source) const;
  std::vector<DatasetSpec> datasets_;
};

struct Rendered {
  std::string text;
  size_t content_chars = 0;   // characters the fields contributed (trimmed), template text excluded
  std::string missing_field;  // set when a required field is absent from the record
};
// Fills `prompt` (the spec's or an override) from a record.
Rendered render_prompt(const DatasetSpec& spec, const std::string& prompt,
                       const nlohmann::json& record);
// Placeholders of a template, in order ("x?" is reported as "x"); Error on an unclosed brace.
std::vector<std::string> template_fields(const std::string& prompt);

// The assets folder (the one place that finds it): $MOETRACE_ASSETS, else an assets/ beside the
// executable or above it (a relocated checkout), else the source tree's assets/.
std::filesystem::path assets_dir();
// assets/demo/data: a data root with real samples of the "demo" group's datasets.
std::filesystem::path demo_data_root();
// assets/demo/spiece.model: the real T5 SentencePiece model.
std::filesystem::path demo_spiece_model();

}  // namespace moetrace::data
