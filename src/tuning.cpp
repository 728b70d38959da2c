#include "tuning.hpp"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <sstream>
#include <utility>

#include "dispatch.hpp"

namespace flashcpu::detail {
namespace {

// Built-in defaults, measured on the 2-core development VM (AVX-512 Xeon, 2 MiB L2 per
// core; docs/performance-notes.md, "Tile choice"). A Br x D block of Q and a Bk x (D + Dv) block of K
// and V stay in L2; the MR x Bk score tile stays in L1. With 12-row AVX-512 tiles,
// 144 x 256 was the best or tied of {64, 96, 144} x 256 on P64, P128, C128, S16K and
// short N=256 (S16K 229 ms against 239 ms at 64 x 256: each block of rows streams the
// whole K and V, so fewer, larger blocks read them less often). With the 6 x 64 tiles,
// {96, 144, 192} x 256 and 144 x 512 were within the noise (+-4%) on P64 and short N=256.
// 144 is a multiple of every ISA's tile rows (6 and 4); the same sizes serve all head dims.
// The AMX kernel (16-row tiles, two at a time) takes 192 x 512 on a Xeon with AMX
// (2026-12-05): a 512-key block halves its per-row softmax bookkeeping and its
// accumulator tile loads and stores per product. tools/ab_builds against 144 x 256, 12
// rounds, per-round medians: bf16 P128 1.048, P64 1.043, C128 1.055, N=256 1.030,
// N=16384 (D=64) 1.026; 16-row AMX decoding 0.992 and 1.011 (noise). flashcpu-tune
// (D = 128, {96, 144, 192} x {256, 512, 1024}) also chose 192 x 512.
TileConfig default_tiles(Isa isa, std::int64_t head_dim) {
  (void)head_dim;
  if (isa == Isa::amx) return {192, 512};
  return {144, 256};
}

// What a tuning file holds.
struct Entries {
  std::map<std::pair<Isa, std::int64_t>, TileConfig> tiles;  // (isa, head_dim) -> tiles
  std::map<Isa, double> min_flops_per_thread;
};

struct Table {
  std::shared_mutex mutex;
  Entries entries;
};

Table& table() {
  static Table t;
  return t;
}

void check_tiles(const TileConfig& tiles, const std::string& where) {
  // Both are rounded up to whole micro-kernel tiles when used (6 rows and 64 keys on
  // AVX-512); the multiples of 8 and 32 are the file format's long-standing rules.
  if (tiles.block_rows < 8 || tiles.block_rows % 8 != 0 || tiles.block_rows > 4096)
    throw Error("flashcpu: " + where + " block_rows: expected a multiple of 8 in [8, 4096], got " +
                std::to_string(tiles.block_rows));
  if (tiles.block_keys < 32 || tiles.block_keys % 32 != 0 || tiles.block_keys > 65536)
    throw Error("flashcpu: " + where + " block_keys: expected a multiple of 32 in [32, 65536], got " +
                std::to_string(tiles.block_keys));
}

Entries parse_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error("flashcpu: tuning file '" + path + "': expected a readable file, got one that cannot be opened");
  Entries entries;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    const auto hash = line.find('#');
    if (hash != std::string::npos) line.erase(hash);
    std::istringstream fields(line);
    std::string isa_text;
    if (!(fields >> isa_text)) continue;  // blank or comment
    const std::string where = "tuning file '" + path + "' line " + std::to_string(number) + ":";
    std::int64_t head_dim = 0;
    TileConfig tiles{};
    std::string extra;
    Isa isa;
    if (!parse_isa(isa_text.c_str(), &isa))
      throw Error("flashcpu: " + where + " expected an ISA (" + isa_names() + "), got '" + isa_text + "'");
    std::string second;
    if (fields >> second && second == "min_flops_per_thread") {
      double flops = 0;
      if (!(fields >> flops) || (fields >> extra) || !(flops >= 1 && flops <= kMaxMinFlopsPerThread)) {
        char range[32];
        std::snprintf(range, sizeof range, "[1, %g]", kMaxMinFlopsPerThread);
        throw Error("flashcpu: " + where + " expected '<isa> min_flops_per_thread <flops>' with flops in " + range +
                    ", got '" + line + "'");
      }
      entries.min_flops_per_thread[isa] = flops;
      continue;
    }
    std::istringstream dims(second);
    if (!(dims >> head_dim) || !dims.eof() || !(fields >> tiles.block_rows >> tiles.block_keys) ||
        (fields >> extra) || head_dim < 1)
      throw Error("flashcpu: " + where +
                  " expected '<isa> <head_dim> <block_rows> <block_keys>' or '<isa> min_flops_per_thread <flops>', got '" +
                  line + "'");
    check_tiles(tiles, where);
    entries.tiles[{isa, head_dim}] = tiles;
  }
  return entries;
}

// Parses the file fully, then replaces the table with it.
void install_file(const std::string& path) {
  Entries entries = parse_file(path);
  Table& t = table();
  std::unique_lock lock(t.mutex);
  t.entries = std::move(entries);
}

void load_environment_file_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (const char* path = std::getenv("FLASHCPU_TUNING_FILE"); path && *path) install_file(path);
  });
}

// Lookups in a table the caller holds the lock of.
TileConfig tiles_in(const Entries& entries, Isa isa, std::int64_t head_dim) {
  // The tuned entry for this head dim, else the one for the next larger tuned head
  // dim (its blocks fit in cache for this one too), else the built-in default.
  auto it = entries.tiles.lower_bound({isa, head_dim});
  if (it != entries.tiles.end() && it->first.first == isa) return it->second;
  return default_tiles(isa, head_dim);
}
double min_flops_in(const Entries& entries, Isa isa) {
  auto it = entries.min_flops_per_thread.find(isa);
  return it != entries.min_flops_per_thread.end() ? it->second : kMinFlopsPerThread;
}

}  // namespace

TileConfig tiles_for(const KernelTable& kernels, std::int64_t head_dim) {
  return tuning_for(kernels, head_dim).tiles;
}

double min_flops_per_thread_for(Isa isa) {
  load_environment_file_once();
  Table& t = table();
  std::shared_lock lock(t.mutex);
  return min_flops_in(t.entries, isa);
}

Tuning tuning_for(const KernelTable& kernels, std::int64_t head_dim) {
  load_environment_file_once();
  Table& t = table();
  std::shared_lock lock(t.mutex);
  return {tiles_in(t.entries, kernels.isa, head_dim), min_flops_in(t.entries, kernels.isa)};
}

}  // namespace flashcpu::detail

namespace flashcpu {

TileConfig tile_config(std::int64_t head_dim) {
  if (head_dim < 1) throw Error("flashcpu: tile_config head_dim: expected >= 1, got " + std::to_string(head_dim));
  return detail::tiles_for(detail::active_kernels(), head_dim);
}

void load_tuning(const std::string& path) {
  // The environment's file first, so that it never replaces this one at a later first use.
  detail::load_environment_file_once();
  detail::install_file(path);
}

void set_tile_config(const std::string& isa, std::int64_t head_dim, std::optional<TileConfig> tiles) {
  detail::Isa parsed;
  if (!detail::parse_isa(isa.c_str(), &parsed))
    throw Error(std::string("flashcpu: set_tile_config isa: expected one of ") + detail::isa_names() + ", got '" + isa + "'");
  if (head_dim < 1) throw Error("flashcpu: set_tile_config head_dim: expected >= 1, got " + std::to_string(head_dim));
  if (tiles) detail::check_tiles(*tiles, "set_tile_config");
  detail::load_environment_file_once();  // so a later first use does not overwrite this
  detail::Table& t = detail::table();
  std::unique_lock lock(t.mutex);
  if (tiles)
    t.entries.tiles[{parsed, head_dim}] = *tiles;
  else
    t.entries.tiles.erase({parsed, head_dim});
}

double min_flops_per_thread(const std::string& isa) {
  detail::Isa parsed;
  if (!detail::parse_isa(isa.c_str(), &parsed))
    throw Error(std::string("flashcpu: min_flops_per_thread isa: expected one of ") + detail::isa_names() + ", got '" +
                isa + "'");
  return detail::min_flops_per_thread_for(parsed);
}

}  // namespace flashcpu
