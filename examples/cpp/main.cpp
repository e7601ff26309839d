// attnsel from C++: scope a component, ask which backend a layer gets and why, then run attention and check it
// against a naive computation.
#include <ATen/ATen.h>
#include <attnsel/attnsel.h>
#include <attnsel/torch.h>

#include <cmath>
#include <iostream>
#include <limits>

namespace {

void explain(const attnsel::Selection& s) {
  std::cout << "backend:   " << attnsel::backend_name(s.backend) << "\n"
            << "source:    " << attnsel::source_name(s.source) << "\n"
            << "component: " << (s.component.empty() ? "<none>" : s.component) << "\n"
            << "reasons:\n";
  for (const std::string& r : s.reasons) std::cout << "  - " << r << "\n";
}

// softmax(q k^T * scale [+ causal mask]) v, written out.
at::Tensor naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(q.size(-1)));
  if (causal) {
    at::Tensor future = at::ones({q.size(2), k.size(2)}, q.options().dtype(at::kBool)).triu(1);
    scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
  }
  return at::matmul(at::softmax(scores, -1), v);
}

bool check(const char* what, const at::Tensor& got, const at::Tensor& want) {
  const double diff = (got - want).abs().max().item<double>();
  const bool ok = diff < 1e-4;
  std::cout << what << ": max |attnsel - naive| = " << diff << (ok ? "  OK" : "  MISMATCH") << "\n";
  return ok;
}

}  // namespace

int main() {
  try {
    // Names are normalised like the command line's: case, spaces and aliases (fa3/fa4 -> fa) are accepted.
    const std::optional<attnsel::BackendId> native = attnsel::find_backend(" Native ");

    // Every layer of the VAE built (or run) on this thread inside the scope gets `native`, unless an explicit or
    // forced backend outranks it. The scope is per thread and ends with the block, also on exceptions.
    attnsel::ComponentScope vae("vae", native);

    attnsel::SelectionRequest layer;  // what a layer asks for: head size, dtype, device
    layer.head_size = 64;
    layer.dtype = attnsel::DType::F32;
    layer.device = attnsel::DeviceType::CPU;
    const attnsel::Selection selection = attnsel::select_backend(layer);
    explain(selection);

    at::manual_seed(0);
    const at::Tensor q = at::randn({2, 4, 40, 64});  // (batch, heads, seq, head_dim)
    const at::Tensor k = at::randn({2, 4, 56, 64});
    const at::Tensor v = at::randn({2, 4, 56, 64});

    // Dispatches like torch.ops.attnsel.attention: selection with this thread's scope, then the kernel table.
    bool ok = check("attention", attnsel::attention(q, k, v), naive_attention(q, k, v, false));

    attnsel::AttentionOptions causal;
    causal.is_causal = true;
    causal.backend = attnsel::BackendId::TORCH_SDPA;  // explicit: outranks the component scope
    ok = check("causal, torch_sdpa", attnsel::attention(q, k, v, causal), naive_attention(q, k, v, true)) && ok;

    if (selection.backend != attnsel::BackendId::NATIVE || selection.source != attnsel::Source::Component) {
      std::cout << "unexpected selection\n";
      ok = false;
    }
    std::cout << (ok ? "example: OK" : "example: FAILED") << std::endl;
    return ok ? 0 : 1;
  } catch (const std::exception& e) {  // refusals: std::invalid_argument / c10::Error, with every reason
    std::cerr << "attnsel example: " << e.what() << std::endl;
    return 1;
  }
}
