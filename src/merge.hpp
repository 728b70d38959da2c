// The log-sum-exp merge of partial attention results over disjoint key sets: split-KV
// decoding merges its chunks with it, and merge_into the caller's shards.
#pragma once

#include <cstdint>

namespace flashcpu::detail {

/// One row's partial result: its numerator is e^log_scale * values and its denominator
/// e^log_scale * sum (natural log). A normalized output with its lse is
/// {out, stride, lse, 1}; a running (acc, max, sum) of the kernels is {acc, 1, max * ln 2,
/// sum}. log_scale = -inf marks a part that saw no key: it is left out entirely, so its
/// values may hold anything. Null values: a part that adds to the denominator only (an
/// attention sink, {nullptr, 0, sink, 1}).
struct Partial {
  const float* values;
  std::int64_t stride;
  float log_scale;
  float sum;
};

/// The most parts merge_partials takes: decoding's chunks of a head (at most 64) and a sink.
constexpr int kMaxMergeParts = 65;

/// Merges `count` parts of a row of `columns` values in part order (so the result does
/// not depend on who computed which part): merged[c * merged_stride] = the weighted mean,
/// or empty_value when no part saw a key. `merged` may alias a part's values (each column
/// is read before it is written). Returns the merged lse, -inf for a row with no key; a
/// NaN anywhere in a counted part goes through.
float merge_partials(const Partial* parts, std::int64_t count, std::int64_t columns, float empty_value, float* merged,
                     std::int64_t merged_stride);

}  // namespace flashcpu::detail
