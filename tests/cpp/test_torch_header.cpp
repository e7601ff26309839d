// <attnsel/torch.h> is self-sufficient: this TU includes nothing else (compiled with warnings as errors).
#include <attnsel/torch.h>

// Not called: compiling it is the test.
at::Tensor attnsel_torch_header_compiles(const at::Tensor& q) {
  attnsel::AttentionOptions opts;
  opts.is_causal = true;
  opts.backend = attnsel::find_backend("native");
  return attnsel::attention(q, q, q, opts);
}
