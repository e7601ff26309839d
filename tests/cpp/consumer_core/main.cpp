// Selects with a component scope through the installed, torch-free attnsel::core.
#include <attnsel/attnsel.h>

#include <iostream>

int main() {
  attnsel::set_backend_availability(attnsel::BackendId::NATIVE, attnsel::DeviceType::CPU, true, "");
  attnsel::ComponentScope scope("vae", attnsel::find_backend(" Native "));
  attnsel::SelectionRequest request;
  request.head_size = 512;
  const attnsel::Selection s = attnsel::select_backend(request);
  std::cout << attnsel::backend_name(s.backend) << " (" << attnsel::source_name(s.source) << ", component "
            << s.component << ")\n";
  return s.backend == attnsel::BackendId::NATIVE && s.source == attnsel::Source::Component && s.component == "vae"
             ? 0
             : 1;
}
