// Selects with a component scope through the installed, torch-free attnsel::core.
#include <attnsel/attnsel.h>

#include <iostream>

int main() {
  // Without the torch layer nothing is registered: a torch-free caller registers what it implements.
  attnsel::BackendDescriptor native;
  native.backend = attnsel::BackendId::NATIVE;
  native.device = attnsel::DeviceType::CPU;
  native.f32 = true;
  native.max_head = 512;
  attnsel::register_backend(native);
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
