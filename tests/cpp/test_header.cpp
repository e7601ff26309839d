// <attnsel/attnsel.h> is self-sufficient: this TU includes nothing else, and it is compiled with warnings as
// errors. (Also keep it torch-free: nothing here may need ATen.)
#include <attnsel/attnsel.h>

int main() {
  attnsel::SelectionRequest request;
  request.head_size = 64;
  attnsel::Selection selection;
  const std::optional<attnsel::BackendId> id = attnsel::find_backend("fa3");
  const std::size_t n = attnsel::selection_cache_size();
  (void)selection;
  (void)n;
  return id == attnsel::BackendId::FA && attnsel::backend_name(*id) == "fa" && request.head_size == 64 ? 0 : 1;
}
