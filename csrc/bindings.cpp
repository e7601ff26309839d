// pybind11 bindings: selection, context, descriptors and the tuning table (our kernels run only through
// torch.ops.attnsel; tensors come here to be read for a call's plan, and the eager route hands a call planned to
// PyTorch's SDPA to ATen's op, see route_py).
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/csrc/Exceptions.h>  // HANDLE_TH_ERRORS: c10 errors as PyTorch raises them
#include <torch/csrc/autograd/python_variable.h>  // THPVariable_Check / THPVariable_Unpack / THPVariable_Wrap
#include <torch/csrc/utils/pybind.h>  // the at::Tensor caster

#include <stdexcept>

#include "attnsel/attnsel.h"
#include "core/internal.h"
#include "kernels/cpu/attention_cpu.h"
#include "torch/dispatch.h"

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
Role parse_role(const std::optional<std::string>& s) {
  if (!s || s->empty()) return Role::None;
  if (auto r = find_role(*s)) return *r;
  throw std::invalid_argument("attnsel: role must be one of ['cross', 'self'], got '" + *s + "'");
}
MaskKind parse_mask(const std::string& s) {
  if (s == "none") return MaskKind::None;
  if (s == "bool") return MaskKind::Bool;
  if (s == "additive") return MaskKind::Additive;
  throw std::invalid_argument("attnsel: mask kind must be one of none, bool, additive; got '" + s + "'");
}

// A component context crosses the boundary as (backend id or None, component, set_by_python, self id, cross id).
using ScopeTuple = std::tuple<std::optional<int>, std::string, bool, std::optional<int>, std::optional<int>>;
std::optional<ScopeTuple> context_to_py(const std::optional<ComponentContext>& c) {
  if (!c) return std::nullopt;
  return ScopeTuple{from_opt_id(c->backend), c->component, c->set_by_python, from_opt_id(c->role_backends[0]),
                    from_opt_id(c->role_backends[1])};
}
std::optional<ComponentContext> from_py(const std::optional<ScopeTuple>& c) {
  if (!c) return std::nullopt;
  ComponentContext ctx{to_opt_id(std::get<0>(*c)), std::get<1>(*c), std::get<2>(*c), {}};
  ctx.role_backends = {to_opt_id(std::get<3>(*c)), to_opt_id(std::get<4>(*c))};
  return ctx;
}

// The policy of a Python task's view (None: no Python scope; a scope a C++ caller entered on this thread still
// counts, a mirror of another task's Python scope does not): a named id, or nothing = auto.
std::optional<BackendId> view_policy(const std::optional<ComponentContext>& view, bool has_view) {
  std::optional<ComponentContext> ctx = view;
  if (!has_view) {
    ctx = current_component();
    if (ctx && ctx->set_by_python) ctx.reset();
  }
  return resolve_policy(std::nullopt, Role::None, ctx ? &*ctx : nullptr).first;
}

// attnsel.attention's plan for a call: the backend id the op will run (checked: a refusal raises the op's
// c10::ValueError), or kRouteSdpa when that is torch_sdpa and the op would pass the call to SDPA unchanged.
constexpr int kRouteSdpa = -3;
constexpr double kReleaseGilWork = 1 << 24;

// Releases the GIL for its scope.
struct GilRelease {
  PyThreadState* state = PyEval_SaveThread();
  ~GilRelease() { PyEval_RestoreThread(state); }
};

int plan_route(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
               bool is_causal, std::int64_t backend) {
  using namespace attnsel::torch_glue;
  check_call_inputs(q, k, v, mask);
  const BackendId chosen = plan_backend(q, k, v, mask, is_causal, backend, inputs_need_grad(q, k, v));
  if (chosen == BackendId::TORCH_SDPA && sdpa_takes_call_unchanged(q, mask, is_causal)) return kRouteSdpa;
  return static_cast<int>(chosen);
}

// _C.route(q, k, v, attn_mask, is_causal, scale, backend, context=None), on every eager attnsel.attention call and
// auto / torch_sdpa layer call. It resolves the policy, plans the call and, when the plan is SDPA taking the call
// unchanged, runs ATen's scaled_dot_product_attention itself and returns its output: the same op F.sdpa reaches
// (dispatcher, autograd, errors), without the Python argument parsing (that and the op's boxed call were the
// route's cost over calling SDPA directly). Otherwise it returns the backend id for torch.ops.attnsel.attention,
// or -3 when SDPA should run from Python because an input or a mode overrides __torch_function__.
// A vectorcall function: pybind11's argument conversion cost more than the plan itself.
// backend: a named id, -2 = auto, or -1 = the policy of `context` (a task's scope view, as call_policy).
PyObject* route_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs < 7 || nargs > 8) {
    PyErr_SetString(PyExc_TypeError, "route(q, k, v, attn_mask, is_causal, scale, backend, context=None)");
    return nullptr;
  }
  static const char* const kNames[] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i)
    if (!THPVariable_Check(args[i])) {
      PyErr_Format(PyExc_TypeError, "attnsel.attention: %s must be a tensor, got %s", kNames[i], Py_TYPE(args[i])->tp_name);
      return nullptr;
    }
  PyObject* const mask_obj = args[3];
  if (mask_obj != Py_None && !THPVariable_Check(mask_obj)) {
    PyErr_Format(PyExc_TypeError, "attnsel.attention: attn_mask must be a tensor or None, got %s",
                 Py_TYPE(mask_obj)->tp_name);
    return nullptr;
  }
  const int causal = PyObject_IsTrue(args[4]);
  std::optional<double> scale;
  if (args[5] != Py_None) {
    scale = PyFloat_AsDouble(args[5]);
    if (*scale == -1.0 && PyErr_Occurred()) return nullptr;
  }
  const long backend = PyLong_AsLong(args[6]);
  if (causal < 0 || (backend == -1 && PyErr_Occurred())) return nullptr;
  std::int64_t id = backend;
  if (id == torch_glue::kContextBackend) {
    const bool has_view = nargs == 8 && args[7] != Py_None;
    std::optional<ComponentContext> view;
    try {
      if (has_view) view = from_py(py::cast<ScopeTuple>(py::handle(args[7])));
    } catch (const py::cast_error& e) {
      PyErr_Format(PyExc_TypeError, "attnsel: malformed scope view: %s", e.what());
      return nullptr;
    }
    const std::optional<BackendId> policy = view_policy(view, has_view);
    id = policy ? static_cast<int>(*policy) : torch_glue::kAutoBackend;
  }
  const at::Tensor& q = THPVariable_Unpack(args[0]);
  const at::Tensor& k = THPVariable_Unpack(args[1]);
  const at::Tensor& v = THPVariable_Unpack(args[2]);
  std::optional<at::Tensor> mask;
  if (mask_obj != Py_None) mask = THPVariable_Unpack(mask_obj);
  int route;
  try {
    route = plan_route(q, k, v, mask, causal != 0, id);
  } catch (const std::invalid_argument& e) {  // an id out of range
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  if (route != kRouteSdpa) return PyLong_FromLong(route);
  // Tensor subclasses (exact Tensor and Parameter have no __torch_function__ of their own) and torch function modes
  // (e.g. `with torch.device(...)`) take the Python route, where F.sdpa hands them the call.
  if (at::impl::torch_function_mode_enabled()) return PyLong_FromLong(kRouteSdpa);
  for (PyObject* t : {args[0], args[1], args[2], mask_obj})
    if (t != Py_None && !THPVariable_CheckExact(t)) return PyLong_FromLong(kRouteSdpa);
  // As F.sdpa, without the GIL, so that a long call does not hold up other threads; but not for a small call
  // (under ~2^24 multiply-adds, a few microseconds), where the release and re-acquire cost ~0.5 us, a tenth of it.
  const double work = static_cast<double>(q.numel()) * k.size(-2) * (k.size(-1) + v.size(-1)) / q.size(-1);
  std::optional<GilRelease> no_gil;
  if (work > kReleaseGilWork) no_gil.emplace();
  at::Tensor out = at::scaled_dot_product_attention(q, k, v, mask, 0.0, causal != 0, scale,
                                                    /*enable_gqa=*/q.size(1) != k.size(1));
  no_gil.reset();
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// The planner's signature of a call, from its tensors (the op's validation and its mask rules).
CallSignature signature_of_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask, bool is_causal, bool return_lse) {
  using namespace attnsel::torch_glue;
  try {
    check_call_inputs(q, k, v, mask);
    return call_signature(q, k, v, mask, is_causal, inputs_need_grad(q, k, v), return_lse);
  } catch (const c10::ValueError& e) {
    throw py::value_error(e.what_without_backtrace());
  }
}

SelectionRequest make_request(int head_size, const std::string& dtype, const std::string& device,
                              const std::optional<std::vector<int>>& supported, std::optional<int> selected,
                              const std::optional<std::string>& role) {
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
  r.role = parse_role(role);
  return r;
}

using PySelection = std::tuple<int, std::string, std::string, std::vector<std::string>, bool>;
PySelection selection_to_py(const Selection& s) {
  return {static_cast<int>(s.backend), std::string(source_name(s.source)), s.component, s.reasons, s.measured};
}

py::dict features_to_py(const Features& f) {
  py::dict d;
  d["bool_mask"] = f.bool_mask;
  d["additive_mask"] = f.additive_mask;
  d["key_padding_mask_only"] = f.key_padding_mask_only;
  d["causal"] = f.causal;
  d["causal_any_lengths"] = f.causal_any_lengths;
  d["grouped_query"] = f.grouped_query;
  d["different_lengths"] = f.different_lengths;
  d["different_value_head"] = f.different_value_head;
  d["lse"] = f.lse;
  d["backward"] = f.backward;
  d["deterministic"] = f.deterministic;
  return d;
}

template <class T>
T take(const py::dict& d, const char* key, T fallback) {
  return d.contains(key) ? d[key].cast<T>() : fallback;
}

// A descriptor from Python (the bridges): the same fields as BackendDescriptor, by name. No call check (data only).
BackendDescriptor descriptor_from_py(int backend, const std::string& device, const py::dict& d) {
  static const char* known[] = {"f32", "f16", "bf16", "min_head", "max_head", "head_multiple", "min_sm", "features",
                                "available", "unavailable_reason", "library", "auto_rank"};
  for (auto item : d) {
    const std::string key = item.first.cast<std::string>();
    bool ok = false;
    for (const char* k : known) ok = ok || key == k;
    if (!ok) throw std::invalid_argument("attnsel: unknown descriptor field '" + key + "'");
  }
  BackendDescriptor out;
  out.backend = to_id(backend);
  out.device = parse_device(device);
  out.f32 = take(d, "f32", false);
  out.f16 = take(d, "f16", false);
  out.bf16 = take(d, "bf16", false);
  out.min_head = take(d, "min_head", 1);
  out.max_head = take(d, "max_head", 1 << 20);
  out.head_multiple = take(d, "head_multiple", 1);
  out.min_sm = take(d, "min_sm", 0);
  out.available = take(d, "available", true);
  out.unavailable_reason = take(d, "unavailable_reason", std::string());
  out.library = take(d, "library", std::string());
  out.auto_rank = take(d, "auto_rank", -1);
  if (d.contains("features")) {
    const py::dict f = d["features"].cast<py::dict>();
    Features& o = out.features;
    for (auto item : f) {
      const std::string key = item.first.cast<std::string>();
      const bool v = item.second.cast<bool>();
      if (key == "bool_mask") o.bool_mask = v;
      else if (key == "additive_mask") o.additive_mask = v;
      else if (key == "key_padding_mask_only") o.key_padding_mask_only = v;
      else if (key == "causal") o.causal = v;
      else if (key == "causal_any_lengths") o.causal_any_lengths = v;
      else if (key == "grouped_query") o.grouped_query = v;
      else if (key == "different_lengths") o.different_lengths = v;
      else if (key == "different_value_head") o.different_value_head = v;
      else if (key == "lse") o.lse = v;
      else if (key == "backward") o.backward = v;
      else if (key == "deterministic") o.deterministic = v;
      else throw std::invalid_argument("attnsel: unknown feature '" + key + "'");
    }
  }
  return out;
}

py::object descriptor_to_py(const std::optional<BackendDescriptor>& d) {
  if (!d) return py::none();
  py::dict out;
  out["f32"] = d->f32;
  out["f16"] = d->f16;
  out["bf16"] = d->bf16;
  out["min_head"] = d->min_head;
  out["max_head"] = d->max_head;
  out["head_multiple"] = d->head_multiple;
  out["min_sm"] = d->min_sm;
  out["features"] = features_to_py(d->features);
  out["available"] = d->available;
  out["unavailable_reason"] = d->unavailable_reason;
  out["library"] = d->library;
  out["auto_rank"] = d->auto_rank;
  out["preferred_rank"] = d->preferred_rank;
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "attnsel native core: backend registry and descriptors, component context, policy and plan";

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

  py::class_<CallSignature>(m, "CallSignature", "One attention call's signature, as the planner takes it.")
      .def(py::init([](std::int64_t batch, std::int64_t heads_q, std::int64_t heads_kv, std::int64_t seq_q,
                       std::int64_t seq_kv, int head_dim, int head_dim_v, const std::string& dtype,
                       const std::string& device, const std::string& mask, bool mask_key_padding, bool causal,
                       bool needs_grad, bool needs_lse) {
             CallSignature c;
             c.batch = batch;
             c.heads_q = heads_q;
             c.heads_kv = heads_kv;
             c.seq_q = seq_q;
             c.seq_kv = seq_kv;
             c.head_dim = head_dim;
             c.head_dim_v = head_dim_v;
             c.dtype = parse_dtype(dtype);
             c.device = parse_device(device);
             c.mask = parse_mask(mask);
             c.mask_key_padding = mask_key_padding;
             c.causal = causal;
             c.needs_grad = needs_grad;
             c.needs_lse = needs_lse;
             return c;
           }),
           py::arg("batch"), py::arg("heads_q"), py::arg("heads_kv"), py::arg("seq_q"), py::arg("seq_kv"),
           py::arg("head_dim"), py::arg("head_dim_v") = 0, py::arg("dtype") = "float32", py::arg("device") = "cpu",
           py::arg("mask") = "none", py::arg("mask_key_padding") = false, py::arg("causal") = false,
           py::arg("needs_grad") = false, py::arg("needs_lse") = false)
      .def("__repr__", [](const CallSignature& c) { return "CallSignature(" + describe(c) + ")"; })
      .def("bucket", &tuning_bucket, "The tuning table's key for this call (lengths bucketed by half-octaves).")
      .def_readonly("batch", &CallSignature::batch)
      .def_readonly("heads_q", &CallSignature::heads_q)
      .def_readonly("heads_kv", &CallSignature::heads_kv)
      .def_readonly("seq_q", &CallSignature::seq_q)
      .def_readonly("seq_kv", &CallSignature::seq_kv)
      .def_readonly("head_dim", &CallSignature::head_dim)
      .def_property_readonly("head_dim_v", &CallSignature::value_head_dim)
      .def_property_readonly("dtype", [](const CallSignature& c) { return std::string(dtype_name(c.dtype)); })
      .def_property_readonly("device", [](const CallSignature& c) { return std::string(device_name(c.device)); })
      .def_property_readonly("mask", [](const CallSignature& c) { return std::string(mask_kind_name(c.mask)); })
      .def_readonly("mask_key_padding", &CallSignature::mask_key_padding)
      .def_readonly("causal", &CallSignature::causal)
      .def_readonly("needs_grad", &CallSignature::needs_grad)
      .def_readonly("needs_lse", &CallSignature::needs_lse);

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

  // Policy at layer build time (explicit > forced > component.role > component > global > auto), checked on what
  // is known then.
  m.def("select", [](int head_size, const std::string& dtype, const std::string& device,
                     std::optional<std::vector<int>> supported, std::optional<int> selected,
                     std::optional<ScopeTuple> context, std::optional<std::string> role) {
    SelectionRequest r = make_request(head_size, dtype, device, supported, selected, role);
    std::optional<ComponentContext> ctx = from_py(context);
    return selection_to_py(select_backend_in(r, ctx ? &*ctx : nullptr));
  }, py::arg("head_size"), py::arg("dtype"), py::arg("device"), py::arg("supported"), py::arg("selected"),
     py::arg("context"), py::arg("role") = py::none(),
     "Select with an explicit component context (the caller's task view).");
  // The per-call policy of attnsel.attention(backend=None): the op's backend argument (a named id, or -2 = auto).
  // context None: no Python scope in this task; a scope a C++ caller entered on this thread still counts (a
  // mirror of another task's Python scope does not).
  m.def("call_policy", [](std::optional<ScopeTuple> context) -> int {
    const std::optional<BackendId> backend = view_policy(from_py(context), context.has_value());
    return backend ? static_cast<int>(*backend) : static_cast<int>(torch_glue::kAutoBackend);
  }, py::arg("context"));
  // The route of an eager call (route_py above): SDPA's output, or the backend id for the op.
  static PyMethodDef route_def = {"route", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&route_py)),
                                  METH_FASTCALL, "route(q, k, v, attn_mask, is_causal, scale, backend, context=None)"};
  m.add_object("route", py::reinterpret_steal<py::object>(PyCFunction_New(&route_def, nullptr)));
  m.attr("ROUTE_SDPA_FROM_PYTHON") = kRouteSdpa;
  m.def("call_signature", &signature_of_call, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_mask"),
        py::arg("is_causal"), py::arg("return_lse"),
        "The planner's view of a call (ValueError, with the op's message, for a call the op refuses).");
  // The plan for a call: backend None = this view's policy, -2 = auto; returns the selection tuple.
  m.def("explain_call", [](const CallSignature& call, std::optional<int> backend, std::optional<ScopeTuple> context) {
    if (backend)
      return selection_to_py(
          plan_call(call, *backend == torch_glue::kAutoBackend ? std::nullopt : std::optional(to_id(*backend))));
    std::optional<ComponentContext> ctx = from_py(context);
    return selection_to_py(select_for_call(call, ctx ? &*ctx : nullptr));
  }, py::arg("call"), py::arg("backend"), py::arg("context"));
  m.def("refusal_reasons", [](int id, const CallSignature& call) { return refusal_reasons(to_id(id), call); },
        py::arg("backend"), py::arg("call"));

  // Descriptors: registered by the layer that implements a backend (Python bridges register theirs here).
  m.def("register_backend", [](int backend, const std::string& device, const py::dict& descriptor) {
    register_backend(descriptor_from_py(backend, device, descriptor));
  }, py::arg("backend"), py::arg("device"), py::arg("descriptor"));
  m.def("backend_descriptor", [](int backend, const std::string& device) {
    return descriptor_to_py(backend_descriptor(to_id(backend), parse_device(device)));
  }, py::arg("backend"), py::arg("device"));
  m.def("set_backend_availability", [](int id, const std::string& device, bool available, std::string reason) {
    set_backend_availability(to_id(id), parse_device(device), available, std::move(reason));
  }, py::arg("backend"), py::arg("device"), py::arg("available"), py::arg("reason"));
  m.def("set_cuda_compute_capability", &set_cuda_compute_capability, py::arg("major"), py::arg("minor"));

  // Tuning table (attnsel/tuning.py owns the file; the planner reads this in-memory copy).
  m.def("set_tuning_entry", [](const std::string& bucket, const std::vector<std::pair<int, double>>& ms) {
    std::vector<std::pair<BackendId, double>> entry;
    for (const auto& [id, t] : ms) entry.emplace_back(to_id(id), t);
    set_tuning_entry(bucket, std::move(entry));
  }, py::arg("bucket"), py::arg("milliseconds"));
  m.def("tuning_entry", [](const std::string& bucket) -> std::optional<std::vector<std::pair<int, double>>> {
    auto e = tuning_entry(bucket);
    if (!e) return std::nullopt;
    std::vector<std::pair<int, double>> out;
    for (const auto& [id, t] : *e) out.emplace_back(static_cast<int>(id), t);
    return out;
  }, py::arg("bucket"));
  m.def("clear_tuning_table", &clear_tuning_table);
  m.def("tuning_table_size", &tuning_table_size);

  m.def("selection_cache_size", &selection_cache_size);
  m.def("selection_cache_hits", &selection_cache_hits);
  m.def("clear_selection_cache", &clear_selection_cache);

  // What tuning tables record besides the device and versions: this build's kernel sources (CMakeLists.txt).
  m.def("kernels_id", [] { return std::string(ATTNSEL_KERNELS_ID); });

  // CPU kernel ISA (benchmarks and tests compare the paths; ATTNSEL_CPU_ISA does the same at load).
  m.def("cpu_isa", [] { return std::string(cpu::active_isa()); });
  m.def("cpu_isa_supported", [](const std::string& isa) { return cpu::isa_supported(isa); }, py::arg("isa"));
  m.def("set_cpu_isa", [](const std::string& isa) {
    if (!cpu::set_isa(isa))
      throw std::invalid_argument("attnsel: CPU ISA '" + isa + "' is unknown or not supported on this machine");
  }, py::arg("isa"));

  m.attr("num_backends") = kNumBackends;

  // Not API: what the cross-language tests need to act as a C++ caller would.
  py::module_ testing = m.def_submodule("_testing", "test hooks (not API): act as a native C++ caller");
  testing.def("run_in_native_scope", [](const std::string& component, std::optional<int> backend, py::function fn) {
    ComponentScope scope(component, to_opt_id(backend));
    return fn();
  }, py::arg("component"), py::arg("backend"), py::arg("fn"),
     "Call fn() inside a native attnsel::ComponentScope (what a C++ caller would do).");
  testing.def("select_thread", [](int head_size, const std::string& dtype, const std::string& device,
                                  std::optional<std::vector<int>> supported, std::optional<int> selected) {
    auto s = select_backend(make_request(head_size, dtype, device, supported, selected, std::nullopt));
    return std::make_tuple(static_cast<int>(s.backend), std::string(source_name(s.source)), s.component, s.reasons);
  }, py::arg("head_size"), py::arg("dtype"), py::arg("device"), py::arg("supported") = py::none(),
     py::arg("selected") = py::none(), "Select with this thread's native component context (as C++ callers do).");
}
