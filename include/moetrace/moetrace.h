// moetrace's public C++ API in one include: load a Switch checkpoint, run it with an observer,
// tokenize, plan datasets, collect into and read back trace stores.
#pragma once

#include "collect/collect.h"     // run_collect(CollectOptions)
#include "core/error.h"          // moetrace::Error
#include "data/plan.h"           // build_plan(PlanOptions)
#include "engine/engine.h"       // make_engine({device, precision, load}, config, weights)
#include "io/checkpoint.h"       // open_checkpoint(dir)
#include "io/hf_cache.h"         // resolve_model("google/switch-base-128")
#include "model/observer.h"      // Observer: wants(key) / observe(key, tensor)
#include "model/switch_model.h"  // SwitchModel::load(dir).encode(batch, observer)
#include "text/tokenizer.h"      // T5Tokenizer::load(spiece.model).encode(text)
#include "trace/store.h"         // TraceWriter, TraceStore, verify_store
