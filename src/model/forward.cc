#include "model/forward.h"

#include "core/error.h"
#include "core/keys.h"
#include "io/safetensors.h"
#include "model/cpu_engine.h"
#include "model/engine_io.h"
#include "model/recording_observer.h"

namespace moetrace {

namespace {

std::vector<int32_t> read_ids(const SafetensorsFile& f, const std::string& name, int64_t* rows,
                              int64_t* cols) {
  const NamedView* t = f.find(name);
  if (t == nullptr) fail(f.path().string(), ": tensor '", name, "' is missing");
  if (t->view.shape.size() != 2) {
    fail(f.path().string(), ": tensor '", name, "' has shape ", shape_str(t->view.shape),
         ", expected [B, S]");
  }
  *rows = t->view.shape[0];
  *cols = t->view.shape[1];
  std::vector<int32_t> out(static_cast<size_t>(t->view.numel()));
  if (t->view.dtype == DType::kI32) {
    std::copy_n(t->view.as<int32_t>(), out.size(), out.begin());
  } else if (t->view.dtype == DType::kI64) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<int32_t>(t->view.as<int64_t>()[i]);
  } else {
    fail(f.path().string(), ": tensor '", name, "' has dtype ", dtype_name(t->view.dtype),
         ", expected I32 or I64");
  }
  return out;
}

Tensor to_i32(const Tensor& t, Shape shape) {
  Tensor out(DType::kI32, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) {
    out.data<int32_t>()[i] = t.dtype() == DType::kU8 ? t.data<uint8_t>()[i] : t.data<int32_t>()[i];
  }
  return out;
}

Tensor kept_from_dropped(const Tensor& dropped) {
  Tensor out(DType::kI32, dropped.shape());
  for (int64_t i = 0; i < dropped.numel(); ++i)
    out.data<int32_t>()[i] = dropped.data<uint8_t>()[i] ? 0 : 1;
  return out;
}

// Router outputs of one pass under the reference's names.
void add_router(std::map<std::string, Tensor>& out, const RecordingObserver& rec, keys::Stack stack,
                const std::string& prefix, const std::vector<int>& blocks) {
  for (size_t n = 0; n < blocks.size(); ++n) {
    auto k = [&](std::string_view field) { return keys::tensor(stack, blocks[n], field); };
    const std::string p = prefix + "." + std::to_string(n) + ".";
    out[p + "router_input"] = Tensor::from_view(rec.last(k(keys::kHidden)).view());
    out[p + "router_logits"] = Tensor::from_view(rec.last(k(keys::kRouterLogits)).view());
    const Tensor& expert = rec.last(k(keys::kExpert));
    out[p + "top1"] = to_i32(expert, expert.shape());
    out[p + "kept"] = kept_from_dropped(rec.last(k(keys::kDropped)));
    Tensor gate = Tensor::from_view(rec.last(k(keys::kGate)).view());
    Shape s = gate.shape();
    s.push_back(1);
    gate.reshape(s);
    out[p + "max_prob"] = std::move(gate);
  }
}

bool in_decoder(std::string_view key) {
  const auto p = keys::parse(key);
  return p && p->stack == keys::Stack::kDecoder;
}

}  // namespace

ForwardInputs read_forward_inputs(const std::filesystem::path& path) {
  SafetensorsFile f = SafetensorsFile::open(path);
  ForwardInputs in;
  int64_t r = 0, c = 0;
  in.batch.input_ids = read_ids(f, "input_ids", &in.batch.B, &in.batch.S);
  if (in.batch.B < 1 || in.batch.S < 1) {
    fail(path.string(), ": tensor 'input_ids' has shape [", in.batch.B, ", ", in.batch.S,
         "], expected at least one sequence of at least one token");
  }
  in.batch.attention_mask = read_ids(f, "attention_mask", &r, &c);
  if (r != in.batch.B || c != in.batch.S) {
    fail(path.string(), ": tensor 'attention_mask' has shape [", r, ", ", c, "], expected [",
         in.batch.B, ", ", in.batch.S, "] like input_ids");
  }
  if (f.find("decoder_input_ids") != nullptr) {
    in.decoder_input_ids = read_ids(f, "decoder_input_ids", &r, &in.T);
    if (r != in.batch.B)
      fail(path.string(), ": tensor 'decoder_input_ids' has ", r, " rows, expected ", in.batch.B);
  }
  return in;
}

std::map<std::string, Tensor> run_forward(const SwitchModel& model, const ForwardInputs& in,
                                          int64_t generate) {
  return run_forward(*cpu_engine(model), model.config(), in, generate);
}

std::map<std::string, Tensor> run_forward(Engine& engine, const SwitchConfig& c,
                                          const ForwardInputs& in, int64_t generate) {
  std::map<std::string, Tensor> out;
  RecordingObserver rec;
  const Encoded encoded = engine.encode(in.batch, &rec);
  const Tensor& enc = encoded.output;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    out["encoder_hidden_states." + std::to_string(i)] =
        Tensor::from_view(rec.last(keys::tensor(keys::Stack::kEncoder, i, keys::kInput)).view());
  }
  out["encoder_hidden_states." + std::to_string(c.num_layers)] = Tensor::from_view(enc.view());
  out["encoder_last_hidden_state"] = Tensor::from_view(enc.view());
  add_router(out, rec, keys::Stack::kEncoder, "encoder_router", c.sparse_encoder_blocks());
  if (!engine.has_decoder()) return out;
  if (in.T > 0) {
    RecordingObserver drec([](std::string_view k) { return in_decoder(k); });
    out["logits"] = engine.decode(encoded, in.batch, in.decoder_input_ids, in.T, &drec);
    add_router(out, drec, keys::Stack::kDecoder, "decoder_router", c.sparse_decoder_blocks());
  }
  if (generate > 0) {
    RecordingObserver grec([](std::string_view k) {
      const auto p = keys::parse(k);
      return p && p->stack == keys::Stack::kDecoder &&
             (p->field == keys::kRouterLogits || p->field == keys::kExpert);
    });
    GenerateResult g = engine.generate(encoded, in.batch, generate, generate, &grec);
    Tensor ids(DType::kI32, {g.B, g.steps + 1});
    std::copy(g.ids.begin(), g.ids.end(), ids.data<int32_t>());
    out["generated_ids"] = std::move(ids);
    const auto blocks = c.sparse_decoder_blocks();
    for (size_t n = 0; n < blocks.size(); ++n) {
      const std::string p = "generate_decoder_router." + std::to_string(n) + ".";
      out[p + "router_logits"] = stack_steps(
          grec.all(keys::tensor(keys::Stack::kDecoder, blocks[n], keys::kRouterLogits)));
      out[p + "top1"] =
          stack_steps(grec.all(keys::tensor(keys::Stack::kDecoder, blocks[n], keys::kExpert)));
    }
  }
  return out;
}

}  // namespace moetrace
