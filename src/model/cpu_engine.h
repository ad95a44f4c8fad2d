// The CPU engine behind the Engine interface (model/engine.h): SwitchModel, exactly; its
// collection pipeline computes each batch at submit() and poll() hands it back.
#pragma once

#include <memory>

#include "model/engine.h"
#include "model/switch_model.h"

namespace moetrace {

std::unique_ptr<Engine> cpu_engine(std::unique_ptr<SwitchModel> model);
// The same over a model the caller keeps alive.
std::unique_ptr<Engine> cpu_engine(const SwitchModel& model);

// Resident memory of this process (VmRSS), bytes; 0 where /proc is not there: what a CPU engine
// reports as its Memory.
uint64_t resident_bytes();

}  // namespace moetrace
