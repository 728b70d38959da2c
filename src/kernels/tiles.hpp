// The matrix unit's tiles (Intel AMX), behind one small interface that the tile path of
// kernels/forward.hpp is written against. Included only from kernels/forward.hpp, inside
// its per-variant namespace (see vmath.hpp).
//
// Two implementations:
//  - HardwareTiles: the AMX instructions (LDTILECFG, TILELOADD, TDPBF16PS, TILESTORED,
//    TILERELEASE). Only in a translation unit compiled with -mamx-tile -mamx-bf16.
//  - EmulatedTiles: the same instructions, element by element, in plain C++. It lets the
//    tile path's packing, tiling, tails and options be tested against the oracle on any
//    CPU (tests/emulation.cpp); it is never dispatched to.
//
// What the instructions do (Intel SDM, "Intel AMX instruction set reference"):
//  - A tile register holds up to 16 rows of up to 64 bytes; the configuration gives each
//    register its rows and bytes per row.
//  - tdpbf16ps(C, A, B): C is M x N fp32, A is M x K bf16 (row-major, K even), B is K/2
//    rows of N pairs of bf16 ("VNNI" layout: element (k, n) of the K x N operand sits at
//    row k/2, position 2n + k%2). C[m][n] += sum over k of A[m][k] * B(k, n), in the
//    order of the SDM's current pseudo-code (Intel's intrinsics guide, and older SDM
//    text, sum straight into C instead): the even k's products summed by FMAs into one
//    fp32 chain from zero, the odd k's into another, the two chains added, and that sum
//    added to C. Every input, C's included, is read with subnormals as zero, every sum
//    rounded to nearest even and flushed to zero when subnormal; MXCSR plays no part.
//    A Xeon with AMX ran the comparison with the instruction and agreed bitwise on every
//    case (test_bf16_products.cpp, "emulated TDPBF16PS is bitwise the instruction").
// Every user configures, uses and releases the tiles within one call of one thread:
// OpenMP reuses threads, and a configuration is the thread's own.

// The 64-byte LDTILECFG operand, palette 1.
struct alignas(64) TileConfigBlock {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t bytes_per_row[16] = {};
  std::uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfigBlock) == 64, "LDTILECFG reads 64 bytes");

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The intrinsics paste their tile number into the instruction text, so each register is
// spelled out: one specialization per register (and per product the kernel issues).
struct HardwareTiles {
  static constexpr bool enabled = true;
  // Not _tile_loadconfig: GCC 12's gives its asm an 8-byte memory operand, so the
  // compiler may drop or delay stores to the rest of the block (rows, bytes per row). The
  // whole 64-byte block is this asm's operand, so all of it is written first.
  static void configure(const TileConfigBlock& config) { __asm__ volatile("ldtilecfg %0" ::"m"(config)); }
  static void release() { _tile_release(); }
  template <int T>
  static void zero();
  template <int T>
  static void load(const void* base, std::int64_t stride_bytes);
  template <int T>
  static void store(void* base, std::int64_t stride_bytes);
  template <int C, int A, int B>
  static void dot_bf16();
};
#define FLASHCPU_TILE_REGISTER(n)                                                               \
  template <>                                                                                   \
  inline void HardwareTiles::zero<n>() {                                                        \
    _tile_zero(n);                                                                              \
  }                                                                                             \
  template <>                                                                                   \
  inline void HardwareTiles::load<n>(const void* base, std::int64_t stride_bytes) {             \
    _tile_loadd(n, base, stride_bytes);                                                         \
  }                                                                                             \
  template <>                                                                                   \
  inline void HardwareTiles::store<n>(void* base, std::int64_t stride_bytes) {                  \
    _tile_stored(n, base, stride_bytes);                                                        \
  }
FLASHCPU_TILE_REGISTER(0)
FLASHCPU_TILE_REGISTER(1)
FLASHCPU_TILE_REGISTER(2)
FLASHCPU_TILE_REGISTER(3)
FLASHCPU_TILE_REGISTER(4)
FLASHCPU_TILE_REGISTER(5)
FLASHCPU_TILE_REGISTER(6)
FLASHCPU_TILE_REGISTER(7)
#undef FLASHCPU_TILE_REGISTER
#define FLASHCPU_TILE_PRODUCT(c, a, b)             \
  template <>                                      \
  inline void HardwareTiles::dot_bf16<c, a, b>() { \
    _tile_dpbf16ps(c, a, b);                       \
  }
FLASHCPU_TILE_PRODUCT(0, 4, 6)
FLASHCPU_TILE_PRODUCT(1, 4, 7)
FLASHCPU_TILE_PRODUCT(2, 4, 6)
FLASHCPU_TILE_PRODUCT(3, 4, 7)
FLASHCPU_TILE_PRODUCT(2, 5, 6)
FLASHCPU_TILE_PRODUCT(3, 5, 7)
#undef FLASHCPU_TILE_PRODUCT
#endif

struct EmulatedTiles {
  static constexpr bool enabled = true;
  struct State {
    TileConfigBlock config;
    bool configured = false;
    alignas(64) unsigned char data[8][16][64];
  };
  static State& state() {
    thread_local State s;  // like the registers: each thread's own
    return s;
  }
  static void configure(const TileConfigBlock& config) {
    State& s = state();
    assert(config.palette == 1);
    s.config = config;
    s.configured = true;
  }
  static void release() { state().configured = false; }
  template <int T>
  static void zero() {
    static_assert(T >= 0 && T < 8, "eight tile registers");
    State& s = state();
    assert(s.configured);
    for (auto& row : s.data[T])
      for (unsigned char& byte : row) byte = 0;
  }
  template <int T>
  static void load(const void* base, std::int64_t stride_bytes) {
    static_assert(T >= 0 && T < 8, "eight tile registers");
    State& s = state();
    assert(s.configured);
    const int rows = s.config.rows[T], bytes = s.config.bytes_per_row[T];
    for (int r = 0; r < 16; ++r)
      for (int b = 0; b < 64; ++b)
        s.data[T][r][b] = r < rows && b < bytes ? static_cast<const unsigned char*>(base)[r * stride_bytes + b] : 0;
  }
  template <int T>
  static void store(void* base, std::int64_t stride_bytes) {
    static_assert(T >= 0 && T < 8, "eight tile registers");
    State& s = state();
    assert(s.configured);
    const int rows = s.config.rows[T], bytes = s.config.bytes_per_row[T];
    for (int r = 0; r < rows; ++r)
      for (int b = 0; b < bytes; ++b) static_cast<unsigned char*>(base)[r * stride_bytes + b] = s.data[T][r][b];
  }
  template <int C, int A, int B>
  static void dot_bf16() {
    static_assert(C != A && C != B && A != B, "three distinct registers");
    State& s = state();
    assert(s.configured);
    const int m_rows = s.config.rows[C], n_cols = s.config.bytes_per_row[C] / 4;
    const int k_pairs = s.config.bytes_per_row[A] / 4;
    assert(s.config.rows[A] == m_rows && s.config.rows[B] == k_pairs && s.config.bytes_per_row[B] == n_cols * 4);
    using Arith = Bf16DotArithmetic;
    for (int m = 0; m < m_rows; ++m)
      for (int n = 0; n < n_cols; ++n) {
        float even = 0.0f, odd = 0.0f;
        for (int k = 0; k < k_pairs; ++k) {
          even = Arith::fma(even, element<std::uint16_t>(A, m, 4 * k), element<std::uint16_t>(B, k, 4 * n));
          odd = Arith::fma(odd, element<std::uint16_t>(A, m, 4 * k + 2), element<std::uint16_t>(B, k, 4 * n + 2));
        }
        const float c = Arith::add(element<float>(C, m, 4 * n), Arith::add(even, odd));
        __builtin_memcpy(&state().data[C][m][4 * n], &c, 4);
      }
  }

 private:
  template <class T>
  static T element(int tile, int row, int byte) {
    T x;
    __builtin_memcpy(&x, &state().data[tile][row][byte], sizeof(T));
    return x;
  }
};
