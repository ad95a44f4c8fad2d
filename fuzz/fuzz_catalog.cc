// libFuzzer target: a dataset catalog (the format of assets/catalog/datasets.json) from arbitrary
// JSON, then every dataset's read options and a selection of all of it. Only a catalog or
// moetrace::Error may come out.
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "data/catalog.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moetrace::set_log_level(moetrace::LogLevel::kOff);
  const nlohmann::json doc = nlohmann::json::parse(data, data + size, nullptr, false);
  if (doc.is_discarded()) return 0;
  try {
    const moetrace::data::Catalog c = moetrace::data::Catalog::from_json(doc, "fuzz.json");
    for (const auto& d : c.datasets()) {
      (void)d.read_options();
      (void)d.column_names();
      (void)d.id_prefix();
    }
    (void)c.select("maximum");
  } catch (const moetrace::Error&) {
  }
  return 0;
}
