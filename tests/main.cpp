// The Catch2 main of flashcpu_tests.
//
// CTest runs this binary once per ISA with FLASHCPU_ISA set (see CMakeLists.txt).
// When the forced ISA is not available on this machine, only the [dispatch] test
// runs: it WARNs and notes it, and main() exits with kSkipReturnCode, which the
// SKIP_RETURN_CODE test property turns into "Skipped" in ctest's output, never a pass.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdlib>
#include <iostream>
#include <string>

#include "util.hpp"

#ifndef FLASHCPU_TEST_SKIP_RETURN_CODE
#define FLASHCPU_TEST_SKIP_RETURN_CODE 77
#endif

namespace ftest {
namespace {
bool g_isa_unavailable = false;
}
void note_isa_unavailable() { g_isa_unavailable = true; }
bool isa_unavailable_noted() { return g_isa_unavailable; }
}  // namespace ftest

int main(int argc, char* argv[]) {
  Catch::Session session;
  if (const int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;

  // Forced to an ISA this CPU lacks: the rest of the suite would only repeat a lower
  // ISA's run, so run the [dispatch] check alone and report the run as skipped.
  const char* forced = std::getenv("FLASHCPU_ISA");
  if (forced != nullptr && *forced != '\0' && !flashcpu::isa_supported(forced))
    session.configData().testsOrTags = {"[dispatch]"};

  const int failed = session.run();
  const std::string margins = ftest::margin_summary();
  if (!margins.empty())
    std::cout << "worst error / derived bound, per test case (isa " << flashcpu::active_isa() << "; fails above "
              << ftest::kMarginFraction << ", " << ftest::kOptionsMarginFraction << " for options and scores):\n"
              << margins;
  if (failed != 0) return failed;
  if (ftest::isa_unavailable_noted()) {
    std::cout << "FLASHCPU_ISA=" << forced << " is not available on this machine: not run (skipped)\n";
    return FLASHCPU_TEST_SKIP_RETURN_CODE;
  }
  return 0;
}
