#include "tuning.hpp"

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
TileConfig default_tiles(Isa isa, std::int64_t head_dim) {
  (void)isa;
  (void)head_dim;
  return {144, 256};
}

struct Table {
  std::shared_mutex mutex;
  std::map<std::pair<Isa, std::int64_t>, TileConfig> entries;  // (isa, head_dim) -> tiles
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

std::map<std::pair<Isa, std::int64_t>, TileConfig> parse_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error("flashcpu: tuning file '" + path + "': expected a readable file, got one that cannot be opened");
  std::map<std::pair<Isa, std::int64_t>, TileConfig> entries;
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
    if (!(fields >> head_dim >> tiles.block_rows >> tiles.block_keys) || (fields >> extra) || head_dim < 1)
      throw Error("flashcpu: " + where + " expected '<isa> <head_dim> <block_rows> <block_keys>', got '" + line + "'");
    check_tiles(tiles, where);
    entries[{isa, head_dim}] = tiles;
  }
  return entries;
}

void load_environment_file_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (const char* path = std::getenv("FLASHCPU_TUNING_FILE"); path && *path) load_tuning(path);
  });
}

}  // namespace

TileConfig tiles_for(const KernelTable& kernels, std::int64_t head_dim) {
  load_environment_file_once();
  Table& t = table();
  std::shared_lock lock(t.mutex);
  // The tuned entry for this head dim, else the one for the next larger tuned head
  // dim (its blocks fit in cache for this one too), else the built-in default.
  auto it = t.entries.lower_bound({kernels.isa, head_dim});
  if (it != t.entries.end() && it->first.first == kernels.isa) return it->second;
  return default_tiles(kernels.isa, head_dim);
}

}  // namespace flashcpu::detail

namespace flashcpu {

TileConfig tile_config(std::int64_t head_dim) {
  if (head_dim < 1) throw Error("flashcpu: tile_config head_dim: expected >= 1, got " + std::to_string(head_dim));
  return detail::tiles_for(detail::active_kernels(), head_dim);
}

void load_tuning(const std::string& path) {
  auto entries = detail::parse_file(path);  // parse fully before replacing anything
  detail::Table& t = detail::table();
  std::unique_lock lock(t.mutex);
  t.entries = std::move(entries);
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
    t.entries[{parsed, head_dim}] = *tiles;
  else
    t.entries.erase({parsed, head_dim});
}

}  // namespace flashcpu
