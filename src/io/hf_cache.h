// Finding models offline: a model directory as it is, or a Hugging Face Hub id looked up in the
// local Hugging Face cache (never the network). The cache is $HF_HUB_CACHE, else
// $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
// ~/.cache/huggingface/hub; a model sits in models--<org>--<name>/snapshots/<revision>/ and
// refs/<branch> holds the revision of a branch.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace moetrace {

struct ResolvedModel {
  std::filesystem::path dir;  // the model directory (a snapshot folder for Hub ids)
  std::string id;             // the Hub id ("google/switch-base-128"), or the directory as given
  std::string revision;       // the snapshot's revision; empty for a plain directory
};

// spec: an existing directory (used as it is), or a Hub id "org/name", optionally "org/name@rev"
// where rev is a branch under refs/ (default main) or a snapshot folder name. Without refs/<branch>
// the only snapshot is used. Throws Error naming every place it looked when nothing is found.
ResolvedModel resolve_model(const std::string& spec);

// The Hub cache folder in use (see above); it need not exist.
std::filesystem::path hf_hub_cache_dir();

// Models in the cache whose id starts with prefix ("google/switch-base-") and whose main snapshot
// holds a checkpoint (model.safetensors[.index.json] or pytorch_model.bin[.index.json]), sorted by
// id with digit runs compared as numbers (switch-base-8 < -16 < ... < -256), so the last is the
// largest.
std::vector<ResolvedModel> list_cached_models(const std::string& prefix);

}  // namespace moetrace
