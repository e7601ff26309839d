// pybind11 bindings: selection and context only (tensor work goes through torch.ops.attnsel).
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "attnsel/attnsel.h"
#include "core/internal.h"
#include "kernels/cpu/attention_cpu.h"

namespace py = pybind11;
using namespace attnsel;

namespace {

BackendId to_id(int v) {
  if (v < 0 || v >= kNumBackends) throw std::invalid_argument("attnsel: backend id out of range: " + std::to_string(v));
  return static_cast<BackendId>(v);
}
std::optional<BackendId> to_opt_id(std::optional<int> v) {
  return v ? std::optional<BackendId>(to_id(*v)) : std::nullopt;
}
std::optional<int> from_opt_id(std::optional<BackendId> id) {
  return id ? std::optional<int>(static_cast<int>(*id)) : std::nullopt;
}

DType parse_dtype(const std::string& s) {
  if (s == "float32") return DType::F32;
  if (s == "float16") return DType::F16;
  if (s == "bfloat16") return DType::BF16;
  throw std::invalid_argument("attnsel: dtype must be one of float32, float16, bfloat16; got '" + s + "'");
}
DeviceType parse_device(const std::string& s) {
  if (s == "cpu") return DeviceType::CPU;
  if (s == "cuda") return DeviceType::CUDA;
  throw std::invalid_argument("attnsel: device type must be 'cpu' or 'cuda'; got '" + s + "'");
}

// A component context crosses the boundary as (backend id or None, component name, set_by_python).
using ScopeTuple = std::tuple<std::optional<int>, std::string, bool>;
std::optional<ScopeTuple> context_to_py(const std::optional<ComponentContext>& c) {
  if (!c) return std::nullopt;
  return ScopeTuple{from_opt_id(c->backend), c->component, c->set_by_python};
}
std::optional<ComponentContext> from_py(const std::optional<ScopeTuple>& c) {
  if (!c) return std::nullopt;
  return ComponentContext{to_opt_id(std::get<0>(*c)), std::get<1>(*c), std::get<2>(*c)};
}

SelectionRequest make_request(int head_size, const std::string& dtype, const std::string& device,
                              const std::optional<std::vector<int>>& supported, std::optional<int> selected) {
  SelectionRequest r;
  r.head_size = head_size;
  r.dtype = parse_dtype(dtype);
  r.device = parse_device(device);
  if (supported) {
    std::vector<BackendId> ids;
    for (int v : *supported) ids.push_back(to_id(v));
    r.supported = std::move(ids);
  }
  r.selected = to_opt_id(selected);
  return r;
}

using PySelection = std::tuple<int, std::string, std::string, std::vector<std::string>>;
PySelection selection_to_py(const Selection& s) {
  return {static_cast<int>(s.backend), std::string(source_name(s.source)), s.component, s.reasons};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "attnsel native core: backend registry, component context and selection";

  m.def("backend_names", [] {
    std::vector<std::string> names;
    for (BackendId id : all_backends()) names.emplace_back(backend_name(id));
    return names;
  }, "Canonical backend names, indexed by backend id.");
  m.def("backend_aliases", [] {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& a : backend_aliases()) out.emplace_back(a.alias, backend_name(a.target));
    return out;
  });
  m.def("find_backend", [](const std::string& name) -> std::optional<int> {
    auto id = find_backend(name);
    return id ? std::optional<int>(static_cast<int>(*id)) : std::nullopt;
  }, py::arg("name"));

  // Context: the Python front mirrors its task's scope into this thread (see DESIGN.md).
  m.def("current_component", [] { return context_to_py(current_component()); });
  m.def("set_current_component", [](std::optional<ScopeTuple> c) {
    return context_to_py(attnsel::detail::set_current_component(from_py(c)));
  }, py::arg("context"), "Replace this thread's component context; returns the previous one.");
  m.def("set_forced_backend", [](std::optional<int> id) { return from_opt_id(attnsel::detail::set_forced_backend(to_opt_id(id))); },
        py::arg("backend"));
  m.def("forced_backend", [] { return from_opt_id(forced_backend()); });
  m.def("set_global_backend", [](std::optional<int> id) { set_global_backend(to_opt_id(id)); }, py::arg("backend"));
  m.def("global_backend", [] { return from_opt_id(global_backend()); });

  m.def("select", [](int head_size, const std::string& dtype, const std::string& device,
                     std::optional<std::vector<int>> supported, std::optional<int> selected,
                     std::optional<ScopeTuple> context) {
    SelectionRequest r = make_request(head_size, dtype, device, supported, selected);
    std::optional<ComponentContext> ctx = from_py(context);
    return selection_to_py(select_backend_in(r, ctx ? &*ctx : nullptr));
  }, py::arg("head_size"), py::arg("dtype"), py::arg("device"), py::arg("supported"), py::arg("selected"),
     py::arg("context"), "Select with an explicit component context (the caller's task view).");
  m.def("select_id", [](int head_size, const std::string& dtype, const std::string& device,
                        std::optional<ScopeTuple> context) {
    std::optional<ComponentContext> ctx = from_py(context);
    return static_cast<int>(
        select_backend_in(make_request(head_size, dtype, device, std::nullopt, std::nullopt), ctx ? &*ctx : nullptr)
            .backend);
  }, py::arg("head_size"), py::arg("dtype"), py::arg("device"), py::arg("context"),
     "The backend id only: the per-call path of attnsel.attention(backend=None).");
  // Everything native that auto selection depends on besides the request and the caller's (Python) scope: the
  // forced backend, the global flag and the capability generation, packed into one int; None while a scope entered
  // from C++ is active on this thread (Python then takes the full path, which sees that scope).
  // attnsel.attention keys its per-call decision cache on it, so a cached answer never outlives the state it was
  // computed from.
  m.def("selection_token", []() -> py::object {
    const std::optional<ComponentContext> ctx = current_component();
    if (ctx && !ctx->set_by_python) return py::none();
    const auto enc = [](std::optional<BackendId> id) { return std::uint64_t(id ? static_cast<int>(*id) + 1 : 0); };
    static_assert(kNumBackends < 64, "token packs backend ids in 6 bits");
    return py::int_((attnsel::detail::generation() << 12) | (enc(forced_backend()) << 6) | enc(global_backend()));
  });
  m.def("select_thread", [](int head_size, const std::string& dtype, const std::string& device,
                            std::optional<std::vector<int>> supported, std::optional<int> selected) {
    return selection_to_py(select_backend(make_request(head_size, dtype, device, supported, selected)));
  }, py::arg("head_size"), py::arg("dtype"), py::arg("device"), py::arg("supported") = py::none(),
     py::arg("selected") = py::none(), "Select with this thread's native component context (as C++ callers do).");
  m.def("refusal_reasons", [](int id, int head_size, const std::string& dtype, const std::string& device) {
    return refusal_reasons(to_id(id), make_request(head_size, dtype, device, std::nullopt, std::nullopt));
  }, py::arg("backend"), py::arg("head_size"), py::arg("dtype"), py::arg("device"));
  m.def("set_backend_availability", [](int id, const std::string& device, bool available, std::string reason) {
    set_backend_availability(to_id(id), parse_device(device), available, std::move(reason));
  }, py::arg("backend"), py::arg("device"), py::arg("available"), py::arg("reason"));
  m.def("set_cuda_compute_capability", &set_cuda_compute_capability, py::arg("major"), py::arg("minor"));

  m.def("selection_cache_size", &selection_cache_size);
  m.def("selection_cache_hits", &selection_cache_hits);
  m.def("clear_selection_cache", &clear_selection_cache);

  // Cross-language checks: a C++ scope entered from Python.
  m.def("run_in_native_scope", [](const std::string& component, std::optional<int> backend, py::function fn) {
    ComponentScope scope(component, to_opt_id(backend));
    return fn();
  }, py::arg("component"), py::arg("backend"), py::arg("fn"),
     "Call fn() inside a native attnsel::ComponentScope (what a C++ caller would do).");

  // CPU kernel ISA control (tests and benchmarks).
  m.def("cpu_isa", [] { return std::string(cpu::active_isa()); });
  m.def("cpu_isa_supported", [](const std::string& isa) { return cpu::isa_supported(isa); }, py::arg("isa"));
  m.def("set_cpu_isa", [](const std::string& isa) {
    if (!cpu::set_isa(isa))
      throw std::invalid_argument("attnsel: CPU ISA '" + isa + "' is unknown or not supported on this machine");
  }, py::arg("isa"));

  m.attr("num_backends") = kNumBackends;
}
