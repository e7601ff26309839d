// A minimal test harness (no dependencies, nothing fetched at build time).
//   TEST(name) { CHECK(x); CHECK_EQ(a, b); CHECK_THROWS_WITH(expr, std::invalid_argument, "substring"); }
// A failed check ends its test (by exception) and the run goes on; main() returns 1 if any test failed.
// Checks must run on the test's own thread: collect values in worker threads and check them after join().
// Usage: ./test_binary [substring]   runs the tests whose names contain the substring.
#pragma once

#include <cstdio>
#include <cstring>
#include <exception>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace attnsel_test {

struct Case {
  const char* name;
  void (*fn)();
};

inline std::vector<Case>& cases() {
  static std::vector<Case> all;
  return all;
}

struct Registrar {
  Registrar(const char* name, void (*fn)()) { cases().push_back({name, fn}); }
};

// Thrown by a failed check; carries the message already printed.
struct CheckFailed {};

[[noreturn]] inline void fail(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
  throw CheckFailed{};
}

template <typename T, typename = void>
struct Printable : std::false_type {};
template <typename T>
struct Printable<T, std::void_t<decltype(std::declval<std::ostream&>() << std::declval<const T&>())>>
    : std::true_type {};

template <typename T>
std::string show(const T& value) {
  if constexpr (Printable<T>::value) {
    std::ostringstream os;
    os << value;
    return os.str();
  } else if constexpr (std::is_enum_v<T>) {
    return std::to_string(static_cast<long long>(value));
  } else {
    return "<value>";
  }
}

inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

inline int run_all(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : "";
  int run = 0, failed = 0;
  for (const Case& c : cases()) {
    if (!std::strstr(c.name, filter)) continue;
    ++run;
    try {
      c.fn();
      std::printf("[ OK ] %s\n", c.name);
    } catch (const CheckFailed&) {
      ++failed;
      std::printf("[FAIL] %s\n", c.name);
    } catch (const std::exception& e) {
      ++failed;
      std::printf("[FAIL] %s: unexpected exception: %s\n", c.name, e.what());
    } catch (...) {
      ++failed;
      std::printf("[FAIL] %s: unexpected non-standard exception\n", c.name);
    }
  }
  std::printf("%d test(s), %d failed\n", run, failed);
  if (run == 0) {
    std::fprintf(stderr, "no test matches '%s'\n", filter);
    return 1;
  }
  return failed ? 1 : 0;
}

}  // namespace attnsel_test

// c10's logging header defines glog-style CHECK macros; in tests, ours win (include this header last).
#undef TEST
#undef CHECK
#undef CHECK_EQ
#undef CHECK_THROWS_WITH

#define ATTNSEL_TEST_CAT2(a, b) a##b
#define ATTNSEL_TEST_CAT(a, b) ATTNSEL_TEST_CAT2(a, b)

#define TEST(name)                                                                              \
  static void name();                                                                           \
  static const ::attnsel_test::Registrar ATTNSEL_TEST_CAT(name, _registrar)(#name, &name);      \
  static void name()

#define CHECK(cond)                                                                             \
  do {                                                                                          \
    if (!(cond)) ::attnsel_test::fail(__FILE__, __LINE__, "CHECK(" #cond ")");                  \
  } while (0)

#define CHECK_EQ(a, b)                                                                          \
  do {                                                                                          \
    /* copies: `a` may name a member of a temporary (f()->x), which a reference would outlive */ \
    const auto attnsel_test_a = (a);                                                            \
    const auto attnsel_test_b = (b);                                                            \
    if (!(attnsel_test_a == attnsel_test_b))                                                    \
      ::attnsel_test::fail(__FILE__, __LINE__,                                                  \
                           "CHECK_EQ(" #a ", " #b "): " + ::attnsel_test::show(attnsel_test_a) + \
                               " != " + ::attnsel_test::show(attnsel_test_b));                  \
  } while (0)

// Checks that `expr` throws `exc_type` whose what() contains `substring`.
#define CHECK_THROWS_WITH(expr, exc_type, substring)                                            \
  do {                                                                                          \
    bool attnsel_test_thrown = false;                                                           \
    try {                                                                                       \
      (void)(expr);                                                                             \
    } catch (const exc_type& attnsel_test_e) {                                                  \
      attnsel_test_thrown = true;                                                               \
      if (!::attnsel_test::contains(attnsel_test_e.what(), (substring)))                        \
        ::attnsel_test::fail(__FILE__, __LINE__,                                                \
                             std::string("CHECK_THROWS_WITH(" #expr "): message lacks '") +     \
                                 (substring) + "': " + attnsel_test_e.what());                  \
    }                                                                                           \
    if (!attnsel_test_thrown)                                                                   \
      ::attnsel_test::fail(__FILE__, __LINE__, "CHECK_THROWS_WITH(" #expr "): nothing thrown (" \
                                               #exc_type " expected)");                         \
  } while (0)

#define ATTNSEL_TEST_MAIN() \
  int main(int argc, char** argv) { return ::attnsel_test::run_all(argc, argv); }
