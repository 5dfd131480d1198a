// CPU kernels of the native backend: a bf16-weight GEMM with fp32 arithmetic (and its int8-weight
// variant), and Qwen3's whole forward pass (a decode step, or a prompt) in one call.
//
// Why: at one to a few rows a decode step streams every weight once, so its floor is memory
// bandwidth; from Python it also pays ~600 small kernel launches. Here the weights stay in the
// checkpoint's bf16 (widening bf16 to fp32 is exact, so products and sums are fp32 arithmetic on
// the checkpoint's values) and everything between two matrix products runs in plain loops.
//
// Written with GCC/Clang vector extensions, so the compiler picks AVX-512, AVX2 or NEON for the
// machine it is built on (soprano/cpu/kernels.py compiles this file with -march=native, or
// -mcpu=native on ARM).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// Floats per vector, and batch rows multiplied per pass over a weight panel: as many as leave
// the accumulators (rows x 2 vectors) in registers (32 with AVX-512, 16 with AVX2).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kMaxPanelRows = 8;
#elif defined(__aarch64__)
// NEON's registers hold 4 floats: GCC keeps wider vector types in memory there (a load and a
// store around every multiply-add). Its 32 registers would take 14 rows (28 accumulators, the
// panel row and a broadcast); the panel products stop at 8.
constexpr int kLanes = 4;
constexpr int kMaxPanelRows = 8;
#else
constexpr int kLanes = 8;
constexpr int kMaxPanelRows = 6;
#endif
constexpr int kPanelWidth = 2 * kLanes;  // output columns per packed weight panel

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t UintVec __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// A panel row as two vectors: columns 0 … kLanes − 1 and kLanes … kPanelWidth − 1. Panels of
// bf16 hold their weights in pairs: the 32-bit word j carries column j in its low half and column
// j + kLanes in its high half, so one load and two bit operations widen a panel row.
inline void load_panel_row(const uint16_t* p, Vec& low, Vec& high) {
  UintVec words;
  std::memcpy(&words, p, sizeof words);
  low = (Vec)(words << 16);
  high = (Vec)(words & 0xFFFF0000u);
}

inline void load_panel_row(const float* p, Vec& low, Vec& high) {
  low = load(p);
  high = load(p + kLanes);
}

// Panels of int8 (the lossy dtype 'int8') hold a row's columns in order, one byte each, so each
// half widens (sign-extend, convert) to one vector of fp32. GCC 12 turns the generic conversion
// into scalar code, hence the x86 instructions by name.
typedef int8_t ByteVec __attribute__((vector_size(kLanes)));

inline Vec widen(const int8_t* p) {
#if defined(__AVX512F__)
  return (Vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  return (Vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
  ByteVec bytes;
  std::memcpy(&bytes, p, sizeof bytes);
  return __builtin_convertvector(bytes, Vec);
#endif
}

inline void load_panel_row(const int8_t* p, Vec& low, Vec& high) {
  low = widen(p);
  high = widen(p + kLanes);
}

template <size_t... Lane>
inline Vec splat(float x, std::index_sequence<Lane...>) {
  return Vec{((void)Lane, x)...};  // an initialiser per lane compiles to one broadcast
}

inline Vec splat(float x) { return splat(x, std::make_index_sequence<kLanes>{}); }

// v with its lanes moved down by Shift (wrapping round).
template <int Shift, size_t... Lane>
inline Vec rotate_lanes(Vec v, std::index_sequence<Lane...>) {
#if defined(__clang__)
  return __builtin_shufflevector(v, v, ((Lane + Shift) % kLanes)...);
#else
  return __builtin_shuffle(v, IntVec{((Lane + Shift) % kLanes)...});
#endif
}

// The sum of the lanes, folding halves together (log2(kLanes) shuffles and adds).
template <int Half = kLanes / 2>
inline float sum(Vec v) {
  if constexpr (Half == 0) {
    return v[0];
  } else {
    return sum<Half / 2>(v + rotate_lanes<Half>(v, std::make_index_sequence<kLanes>{}));
  }
}

// exp(x) to about 1 ulp (Cephes' polynomial on [-ln2/2, ln2/2], scaled by 2^n).
inline Vec fast_exp(Vec x) {
  const Vec round_magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  Vec shifted = x * splat(1.44269504088896341f) + round_magic;
  Vec n = shifted - round_magic;
  Vec r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  Vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  IntVec exponent = ((IntVec)shifted - (IntVec)round_magic + 127) << 23;
  return p * (Vec)exponent;
}

inline float fast_exp(float x) { return fast_exp(splat(x))[0]; }

// ---------------------------------------------------------------------------------------------
// The kernels' threads (docs/kernels.md, "Threads"). A parallel loop hands out runs of its range
// that the calling thread and the pool's workers claim as they come, and it returns once every
// run is done: it never waits for a worker that has not started. A worker that the OS has
// descheduled (a host whose cores run other work) costs at most the run it is computing, where
// an OpenMP region waits at its closing barrier for every thread of its team. Idle workers spin
// for a moment, so that the ~70 loops of a decode step find them awake, then sleep.

#if defined(__linux__)
inline void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
}

inline void futex_wake(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr,
          nullptr, 0);
}
#else
inline void futex_wait(std::atomic<uint32_t>&, uint32_t) { std::this_thread::yield(); }
inline void futex_wake(std::atomic<uint32_t>&) {}
#endif

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// How long a thread that waits spins before it sleeps: longer than the gaps between the loops
// of a step (norms, one row's attention: tens of µs), shorter than a time slice.
constexpr std::chrono::microseconds kSpinBeforeSleep{200};

// Spins until done() or kSpinBeforeSleep has passed; returns done().
template <typename Done>
bool spin_until(const Done& done) {
  const auto deadline = std::chrono::steady_clock::now() + kSpinBeforeSleep;
  for (int round = 0;; ++round) {
    if (done()) return true;
    if (round % 64 == 63 && std::chrono::steady_clock::now() > deadline) return done();
    relax();
  }
}

class ThreadPool {
 public:
  using Body = void (*)(const void* context, int64_t begin, int64_t end);

  static ThreadPool& instance() {
    static ThreadPool* pool = new ThreadPool();  // never destroyed: workers sleep through exit
    return *pool;
  }

  // body(context, begin, end) over runs of `claim` that cover [0, count), on at most `threads`
  // threads, this one included. Runs on this thread alone where that is all there is to do,
  // and where another thread's loop holds the pool (or this is a loop inside a loop).
  void run(int64_t count, int64_t claim, int64_t threads, Body body, const void* context) {
    std::unique_lock<std::mutex> exclusive(mutex_, std::defer_lock);
    if (threads < 2 || count <= claim || !exclusive.try_lock()) {
      body(context, 0, count);
      return;
    }
    TORCH_CHECK(count < kFinished - claim, "a parallel loop of ", count, " items");
    const int64_t runs = (count + claim - 1) / claim;
    const int64_t helpers = std::min<int64_t>({threads - 1, runs - 1, kMaxWorkers});
    while (static_cast<int64_t>(workers_.size()) < helpers) {
      const int64_t id = static_cast<int64_t>(workers_.size());
      workers_.emplace_back([this, id] { serve(id); });
      workers_.back().detach();
    }
    body_.store(body, std::memory_order_relaxed);
    context_.store(context, std::memory_order_relaxed);
    count_.store(count, std::memory_order_relaxed);
    claim_.store(claim, std::memory_order_relaxed);
    helpers_.store(helpers, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    // Epochs count modulo 2^32, the width of the futex words that carry them.
    const uint64_t epoch =
        static_cast<uint32_t>((state_.load(std::memory_order_relaxed) >> 32) + 1);
    state_.store(epoch << 32, std::memory_order_release);
    wake_.fetch_add(1);
    if (sleepers_.load() > 0) futex_wake(wake_);
    work(epoch);
    const auto finished = [&] { return finished_.load() == static_cast<uint32_t>(epoch); };
    while (!spin_until(finished)) {
      waiting_.store(true);
      if (!finished()) futex_wait(finished_, static_cast<uint32_t>(epoch - 1));
      waiting_.store(false);
    }
    // Any worker that still looks at this loop now finds nothing left to claim.
    state_.store((epoch << 32) | kFinished, std::memory_order_release);
  }

 private:
  static constexpr uint64_t kFinished = 0xFFFFFFFFu;  // the index of a loop that has ended
  static constexpr int64_t kMaxWorkers = 255;

  // A worker: wait for a loop, help with it, and so on.
  void serve(int64_t id) {
    uint64_t seen = 0;
    for (;;) {
      const auto fresh = [&] { return state_.load() >> 32 != seen; };
      while (!spin_until(fresh)) {
        const uint32_t word = wake_.load();
        sleepers_.fetch_add(1);
        if (!fresh()) futex_wait(wake_, word);
        sleepers_.fetch_sub(1);
      }
      seen = state_.load() >> 32;
      if (id < helpers_.load(std::memory_order_relaxed)) work(seen);
    }
  }

  // Claim and run runs of loop `epoch` until none is left. The fields read here may already
  // belong to a later loop when this thread comes late, but then the claim fails: a loop's
  // fields change only after it has ended, and it ends only once every claimed run is done.
  void work(uint64_t epoch) {
    const Body body = body_.load(std::memory_order_relaxed);
    const void* context = context_.load(std::memory_order_relaxed);
    const int64_t count = count_.load(std::memory_order_relaxed);
    const int64_t claim = claim_.load(std::memory_order_relaxed);
    uint64_t state = state_.load(std::memory_order_acquire);
    for (;;) {
      const int64_t begin = static_cast<int64_t>(state & kFinished);
      if (state >> 32 != epoch || begin >= count) return;
      if (!state_.compare_exchange_weak(state, state + claim, std::memory_order_acquire)) {
        continue;
      }
      const int64_t end = std::min(count, begin + claim);
      body(context, begin, end);
      if (done_.fetch_add(end - begin, std::memory_order_acq_rel) + (end - begin) == count) {
        finished_.store(static_cast<uint32_t>(epoch));
        if (waiting_.load()) futex_wake(finished_);
      }
      state = state_.load(std::memory_order_acquire);
    }
  }

  std::mutex mutex_;  // one loop at a time; held by its calling thread
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> state_{0};  // the current loop's epoch (high half), next index (low)
  std::atomic<Body> body_{nullptr};
  std::atomic<const void*> context_{nullptr};
  std::atomic<int64_t> count_{0}, claim_{0}, helpers_{0}, done_{0};
  std::atomic<uint32_t> wake_{0}, finished_{0};  // futex words: a new loop; a loop's end
  std::atomic<int64_t> sleepers_{0};
  std::atomic<bool> waiting_{false};
};

// SOPRANO_OPENMP_LOOPS=1 runs the kernels' loops on OpenMP's threads (at::parallel_for, as many
// as torch.set_num_threads says) instead of their own pool: to compare the two.
bool openmp_loops() {
  static const bool openmp = std::getenv("SOPRANO_OPENMP_LOOPS") != nullptr;
  return openmp;
}

// The pool's thread count, for the whole process: 0 follows the calling thread's
// at::get_num_threads() (torch.set_num_threads). A count of its own lets PyTorch's operators run
// on fewer threads than the kernels' loops (soprano/cpu/threads.py says why).
std::atomic<int64_t> g_threads{0};

// How many threads the kernels' loops run on.
int64_t kernel_threads() {
  const int64_t threads = g_threads.load(std::memory_order_relaxed);
  return threads > 0 && !openmp_loops() ? threads : at::get_num_threads();
}

void set_threads(int64_t threads) {
  TORCH_CHECK(threads >= 0, "threads must be 0 (follow torch) or positive, got ", threads);
  g_threads.store(threads, std::memory_order_relaxed);
}

// f(begin, end) over [0, count) in runs of `claim` on the kernels' threads. f must not throw.
template <typename F>
void parallel_runs(int64_t count, int64_t claim, const F& f) {
  if (openmp_loops()) {
    at::parallel_for(0, count, claim, f);
    return;
  }
  ThreadPool::instance().run(
      count, claim, kernel_threads(),
      [](const void* context, int64_t begin, int64_t end) {
        (*static_cast<const F*>(context))(begin, end);
      },
      &f);
}

// ---------------------------------------------------------------------------------------------
// GEMM: y[m, n] (+)= sum_k x[m, k] * W[n, k], W packed as panels [n / kPanelWidth][k][kPanelWidth]
// of bf16 (the LM's weights), float32 (the decoder's) or int8 with scales. A panel product
// multiplies up to kMaxPanelRows rows of x by one panel.

// Writes (or adds) the sums of a panel product: Rows rows of kPanelWidth columns.
template <int Rows>
inline void write_sums(const Vec (&sums)[Rows][2], float* y, int64_t y_stride, bool accumulate) {
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) {
    float* out = y + r * y_stride;
    store(out, accumulate ? load(out) + sums[r][0] : sums[r][0]);
    store(out + kLanes, accumulate ? load(out + kLanes) + sums[r][1] : sums[r][1]);
  }
}

// Weight-only int8 (dtype 'int8'): a scale per output column, so a panel's sums are exact fp32
// sums of x times the int8 weights and the scale is applied once per output. A panel is
// kScaleRows + depth rows of kPanelWidth bytes: its kPanelWidth fp32 scales, then the weights.
// Half the bytes of bf16 per weight, for the decode steps that only stream weights.
constexpr int64_t kScaleRows = sizeof(float);

// Rows of a panel in front of its weights.
template <typename Weight>
constexpr int64_t kHeaderRows = 0;
template <>
constexpr int64_t kHeaderRows<int8_t> = kScaleRows;

// Rows rows of x times Panels panels (`depth` rows of kPanelWidth Weights each, after their
// header; `stride` Weights apart), summed into acc[panel][row]. Each sum runs over k in order
// whatever Rows and Panels are, so a row gets the same bits in any batch.
// `prefetch`: the next panel, fetched into cache while this one is multiplied (or null).
template <int Rows, int Panels, typename Weight>
inline void panel_sums(const float* x, int64_t x_stride, const Weight* panel, int64_t stride,
                       int64_t depth, const Weight* prefetch, Vec (&acc)[Panels][Rows][2]) {
  constexpr int kCacheLine = 64;
  const Weight* weights = panel + kHeaderRows<Weight> * kPanelWidth;
  for (int64_t k = 0; k < depth; ++k) {
    if (prefetch != nullptr) {
      const char* next_row = reinterpret_cast<const char*>(prefetch + k * kPanelWidth);
      for (size_t b = 0; b < kPanelWidth * sizeof(Weight); b += kCacheLine) {
        __builtin_prefetch(next_row + b);
      }
    }
#pragma GCC unroll 2
    for (int q = 0; q < Panels; ++q) {
      Vec w0, w1;
      load_panel_row(weights + q * stride + k * kPanelWidth, w0, w1);
#pragma GCC unroll 8
      for (int r = 0; r < Rows; ++r) {
        const Vec xv = splat(x[r * x_stride + k]);
        acc[q][r][0] += xv * w0;
        acc[q][r][1] += xv * w1;
      }
    }
  }
}

// v as it is, rounded: the compiler may not fuse the product that made it into a later
// addition (-ffp-contract=fast fuses where it sees fit, so one instantiation of a panel product
// would round a scaled sum before adding it to y and another not, and a row's bits would depend
// on its batch). Without FMA (an x86-64 build for CPUs before Haswell) nothing fuses, and the
// vector is no single register there.
inline Vec rounded(Vec v) {
#if defined(__x86_64__) && defined(__FMA__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
  return v;
}

// Writes (or adds) a panel's sums, times its scales for int8.
template <int Rows, typename Weight>
inline void finish(Vec (&sums)[Rows][2], const Weight* panel, float* y, int64_t y_stride,
                   bool accumulate) {
  if constexpr (std::is_same_v<Weight, int8_t>) {
    Vec scale[2];
    std::memcpy(scale, panel, sizeof scale);
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      sums[r][0] = rounded(sums[r][0] * scale[0]);
      sums[r][1] = rounded(sums[r][1] * scale[1]);
    }
  }
  write_sums(sums, y, y_stride, accumulate);
}

template <int Rows, typename Weight>
void panel_product(const float* x, int64_t x_stride, const Weight* panel, int64_t depth,
                   float* y, int64_t y_stride, bool accumulate, const Weight* prefetch) {
  Vec acc[1][Rows][2] = {};
  panel_sums(x, x_stride, panel, 0, depth, prefetch, acc);
  finish(acc[0], panel, y, y_stride, accumulate);
}

// One row (a decode step of one sequence) times two neighbouring panels: four chains of
// multiply-adds instead of two, so the row is not held up by their latency (with int8 weights,
// which take more instructions to widen, a lone row ran at half the memory's speed).
template <typename Weight>
void lone_row_product(const float* x, const Weight* panel, int64_t stride, int64_t depth,
                      float* y, bool accumulate) {
  Vec acc[2][1][2] = {};
  panel_sums(x, 0, panel, stride, depth, static_cast<const Weight*>(nullptr), acc);
  finish(acc[0], panel, y, 0, accumulate);
  finish(acc[1], panel + stride, y + kPanelWidth, 0, accumulate);
}

template <typename Weight>
using PanelProduct = void (*)(const float*, int64_t, const Weight*, int64_t, float*, int64_t, bool,
                              const Weight*);
template <typename Weight>
constexpr PanelProduct<Weight> kPanelProducts[] = {
    nullptr,
    panel_product<1, Weight>,
    panel_product<2, Weight>,
    panel_product<3, Weight>,
    panel_product<4, Weight>,
    panel_product<5, Weight>,
    panel_product<6, Weight>,
    panel_product<7, Weight>,
    panel_product<8, Weight>};
static_assert(sizeof(kPanelProducts<float>) / sizeof(kPanelProducts<float>[0]) > kMaxPanelRows);

// Runs of panels per thread in a product: a few, so that the threads share them as they come.
constexpr int64_t kClaimsPerThread = 4;

// y (+)= x · Wᵀ over all panels, threads claiming runs of whole panels (an even number, so that
// a single row of floats goes two panels at a time: lone_row_product). Input is a float (or,
// for bf16 products, a bf16 pair); a panel has `depth` rows of kPanelWidth Weight words after
// its header. Which thread computes a panel never changes its arithmetic.
template <typename Input, typename Weight, typename Product>
void product_over_panels(const Input* x, int64_t x_stride, int64_t rows, const Weight* weights,
                         int64_t count, int64_t depth, float* y, int64_t y_stride,
                         bool accumulate, const Product* products) {
  const int64_t stride = (kHeaderRows<Weight> + depth) * kPanelWidth;
  auto multiply = [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const Weight* panel = weights + p * stride;
      if constexpr (std::is_same_v<Input, float>) {
        if (rows == 1 && p + 1 < end) {
          lone_row_product(x, panel, stride, depth, y + p * kPanelWidth, accumulate);
          ++p;
          continue;
        }
      }
      const Weight* next = p + 1 < end ? panel + stride : nullptr;
      for (int64_t r = 0; r < rows; r += kMaxPanelRows) {
        const int64_t block = std::min<int64_t>(kMaxPanelRows, rows - r);
        products[block](x + r * x_stride, x_stride, panel, depth,
                        y + r * y_stride + p * kPanelWidth, y_stride, accumulate,
                        rows > 1 ? next : nullptr);
      }
    }
  };
  const int64_t threads = kernel_threads();
  const int64_t claim = count / (threads * kClaimsPerThread) & ~int64_t{1};
  parallel_runs(count, std::max<int64_t>(2, claim), multiply);
}

#if defined(__AVX512BF16__)
// bf16 products (the lossy dtype 'bfloat16'): activations rounded to bf16, and AVX512-BF16's dot
// product multiplies two of them by two weights and adds both to an fp32 sum in one instruction,
// twice the multiply-adds of fp32 FMAs. Pair panels hold, for each pair of input rows k, k + 1,
// the two weights of each column side by side in one 32-bit word.
constexpr bool kBf16Products = true;

inline uint32_t round_to_bf16(float x) {  // to nearest, ties to even
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
}

template <int Rows>
void pair_panel_product(const uint32_t* x, int64_t x_stride, const uint32_t* panel, int64_t pairs,
                        float* y, int64_t y_stride, bool accumulate, const uint32_t* prefetch) {
  Vec acc[Rows][2] = {};
  for (int64_t k = 0; k < pairs; ++k) {
    if (prefetch != nullptr) {
      __builtin_prefetch(prefetch + k * kPanelWidth);
      __builtin_prefetch(prefetch + k * kPanelWidth + kLanes);
    }
    const auto w0 = (__m512bh)_mm512_loadu_si512(panel + k * kPanelWidth);
    const auto w1 = (__m512bh)_mm512_loadu_si512(panel + k * kPanelWidth + kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      const auto xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * x_stride + k]));
      acc[r][0] = (Vec)_mm512_dpbf16_ps((__m512)acc[r][0], w0, xv);
      acc[r][1] = (Vec)_mm512_dpbf16_ps((__m512)acc[r][1], w1, xv);
    }
  }
  write_sums(acc, y, y_stride, accumulate);
}

using PairPanelProduct = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, float*,
                                  int64_t, bool, const uint32_t*);
constexpr PairPanelProduct kPairPanelProducts[] = {
    nullptr,               pair_panel_product<1>, pair_panel_product<2>,
    pair_panel_product<3>, pair_panel_product<4>, pair_panel_product<5>,
    pair_panel_product<6>, pair_panel_product<7>, pair_panel_product<8>};

void pair_gemm(const float* x, int64_t x_stride, int64_t rows, const at::Tensor& panels, float* y,
               int64_t y_stride, bool accumulate) {
  const int64_t pairs = panels.size(1);
  std::vector<uint32_t> x_pairs(rows * pairs);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < pairs; ++k) {
      const float* two = x + r * x_stride + 2 * k;
      x_pairs[r * pairs + k] = round_to_bf16(two[0]) | (round_to_bf16(two[1]) << 16);
    }
  }
  product_over_panels(x_pairs.data(), pairs, rows,
                      reinterpret_cast<const uint32_t*>(panels.data_ptr()), panels.size(0), pairs,
                      y, y_stride, accumulate, kPairPanelProducts);
}
#else
constexpr bool kBf16Products = false;
#endif

// x: rows x depth floats (row stride x_stride); y: rows x width (row stride y_stride). Panels
// of bf16 or float32 hold exact weights (fp32 products); int32 ones are pair panels (bf16
// products); int8 ones hold int8 weights and their scales (fp32 products).
void gemm(const float* x, int64_t x_stride, int64_t rows, const at::Tensor& panels, float* y,
          int64_t y_stride, bool accumulate) {
#if defined(__AVX512BF16__)
  if (panels.scalar_type() == at::kInt) {
    pair_gemm(x, x_stride, rows, panels, y, y_stride, accumulate);
    return;
  }
#endif
  if (panels.scalar_type() == at::kChar) {
    product_over_panels(x, x_stride, rows, panels.data_ptr<int8_t>(), panels.size(0),
                        panels.size(1) - kScaleRows, y, y_stride, accumulate,
                        kPanelProducts<int8_t>);
    return;
  }
  if (panels.scalar_type() == at::kFloat) {
    product_over_panels(x, x_stride, rows, panels.data_ptr<float>(), panels.size(0),
                        panels.size(1), y, y_stride, accumulate, kPanelProducts<float>);
    return;
  }
  product_over_panels(x, x_stride, rows, reinterpret_cast<const uint16_t*>(panels.data_ptr()),
                      panels.size(0), panels.size(1), y, y_stride, accumulate,
                      kPanelProducts<uint16_t>);
}

// Input width of a weight's panels.
int64_t panel_depth(const at::Tensor& panels) {
  switch (panels.scalar_type()) {
    case at::kInt:
      return 2 * panels.size(1);
    case at::kChar:
      return panels.size(1) - kScaleRows;
    default:
      return panels.size(1);
  }
}

// ---------------------------------------------------------------------------------------------
// Element-wise parts of a Qwen3 block.

// out = x / sqrt(mean(x^2) + eps) * weight, as Qwen3RMSNorm computes it in fp32.
void rms_norm(const float* x, const float* weight, int64_t size, float eps, float* out) {
  float squares = 0.0f;
  for (int64_t i = 0; i < size; ++i) squares += x[i] * x[i];
  const float scale = 1.0f / std::sqrt(squares / static_cast<float>(size) + eps);
  for (int64_t i = 0; i < size; ++i) out[i] = weight[i] * (x[i] * scale);
}

// Rotate-half RoPE in place: x * cos + roll(x, half) * signed_sin.
void rotate(float* x, const float* cos, const float* signed_sin, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i];
    const float b = x[i + half];
    x[i] = a * cos[i] + b * signed_sin[i];
    x[i + half] = b * cos[i + half] + a * signed_sin[i + half];
  }
}

void silu_times(const float* gate, const float* up, int64_t size, float* out) {
  int64_t i = 0;
  for (; i + kLanes <= size; i += kLanes) {
    const Vec g = load(gate + i);
    store(out + i, g / (splat(1.0f) + fast_exp(-g)) * load(up + i));
  }
  for (; i < size; ++i) out[i] = gate[i] / (1.0f + fast_exp(-gate[i])) * up[i];
}

void softmax(float* x, int64_t size) {
  const float largest = *std::max_element(x, x + size);
  float total = 0.0f;
  int64_t i = 0;
  for (; i + kLanes <= size; i += kLanes) {
    const Vec e = fast_exp(load(x + i) - splat(largest));
    store(x + i, e);
    total += sum(e);
  }
  for (; i < size; ++i) {
    x[i] = fast_exp(x[i] - largest);
    total += x[i];
  }
  const float inverse = 1.0f / total;
  for (i = 0; i < size; ++i) x[i] *= inverse;
}

struct Layer {
  at::Tensor input_norm, qkv, qk_norm, o, post_attention_norm, gate_up, down;
};

// ---------------------------------------------------------------------------------------------

// Qwen3's forward over a ragged batch: any number of tokens from any number of sequences, each
// sequence with a KV cache of its own. The same arithmetic as soprano/lm/qwen3.py, with the
// weights as bf16 panels. A decode step brings one token per sequence; a new sequence brings its
// prompt, in the same call. Every product is computed row by row in the same order whatever else
// the call holds, so a sequence's results do not depend on the batch it shares (continuous
// batching stays exact).
class Qwen3Forward {
 public:
  Qwen3Forward(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
               double eps, at::Tensor embed, std::vector<std::vector<at::Tensor>> layers,
               at::Tensor norm)
      : heads_(heads),
        kv_heads_(kv_heads),
        head_dim_(head_dim),
        intermediate_(intermediate),
        hidden_(embed.size(1)),
        eps_(static_cast<float>(eps)),
        embed_(std::move(embed)),
        norm_(std::move(norm)) {
    TORCH_CHECK(head_dim % kLanes == 0, "head_dim must be a multiple of ", kLanes);
    TORCH_CHECK(heads % kv_heads == 0, "heads must be a multiple of kv_heads");
    for (auto& tensors : layers) {
      TORCH_CHECK(tensors.size() == 7, "a layer takes 7 tensors");
      layers_.push_back({tensors[0], tensors[1], tensors[2], tensors[3], tensors[4], tensors[5],
                         tensors[6]});
    }
  }

  // tokens, positions, owners: [N] int64. Token i sits at position positions[i] of sequence
  // owners[i], whose cache is keys[owners[i]], values[owners[i]]: [layers, kv_heads, capacity,
  // head_dim] float32. Its key and value are written there, and it attends to positions
  // 0 … positions[i] of that cache (the caller appends each sequence's tokens, in order, right
  // after the ones already cached). cos, signed_sin: the RoPE tables. Returns the post-norm
  // hidden states [N, hidden].
  at::Tensor forward(const at::Tensor& tokens, const at::Tensor& positions,
                     const at::Tensor& owners, const std::vector<at::Tensor>& keys,
                     const std::vector<at::Tensor>& values, const at::Tensor& cos,
                     const at::Tensor& signed_sin) const {
    TORCH_CHECK(tokens.dim() == 1 && positions.sizes() == tokens.sizes() &&
                    owners.sizes() == tokens.sizes(),
                "[N] tokens, positions and owners");
    TORCH_CHECK(positions.scalar_type() == at::kLong && owners.scalar_type() == at::kLong &&
                    positions.is_contiguous() && owners.is_contiguous(),
                "int64 positions and owners");
    TORCH_CHECK(keys.size() == values.size(), "a key and a value cache per sequence");
    for (size_t s = 0; s < keys.size(); ++s) {
      TORCH_CHECK(keys[s].is_contiguous() && values[s].is_contiguous() &&
                      keys[s].scalar_type() == at::kFloat && keys[s].sizes() == values[s].sizes(),
                  "contiguous float32 caches");
      TORCH_CHECK(keys[s].dim() == 4 && keys[s].size(0) == (int64_t)layers_.size() &&
                      keys[s].size(1) == kv_heads_ && keys[s].size(3) == head_dim_,
                  "caches are [layers, kv_heads, capacity, head_dim]");
    }
    const int64_t rows = tokens.size(0);
    const int64_t* position_ = positions.data_ptr<int64_t>();
    const int64_t* owner_ = owners.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK(owner_[r] >= 0 && owner_[r] < (int64_t)keys.size(), "owner out of range");
      TORCH_CHECK(position_[r] >= 0 && position_[r] < keys[owner_[r]].size(2),
                  "the sequence's cache is full");
      TORCH_CHECK(position_[r] < cos.size(0), "position beyond the RoPE tables");
    }
    const int64_t qkv_width = (heads_ + 2 * kv_heads_) * head_dim_;
    const int64_t attention_width = heads_ * head_dim_;
    const auto options = at::TensorOptions().dtype(at::kFloat);

    at::Tensor x = embed_.index_select(0, tokens);
    at::Tensor normed = at::empty({rows, hidden_}, options);
    at::Tensor qkv = at::empty({rows, qkv_width}, options);
    at::Tensor attended = at::empty({rows, attention_width}, options);
    at::Tensor gate_up = at::empty({rows, 2 * intermediate_}, options);
    at::Tensor activated = at::empty({rows, intermediate_}, options);
    float* x_ = x.data_ptr<float>();
    float* normed_ = normed.data_ptr<float>();
    float* qkv_ = qkv.data_ptr<float>();
    float* attended_ = attended.data_ptr<float>();
    float* gate_up_ = gate_up.data_ptr<float>();
    float* activated_ = activated.data_ptr<float>();
    const float* cos_ = cos.data_ptr<float>();
    const float* signed_sin_ = signed_sin.data_ptr<float>();

    const int64_t key_grain = rows_worth_a_thread(qkv_width);
    const int64_t activation_grain = rows_worth_a_thread(2 * intermediate_);

    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& layer = layers_[l];
      // Token r's layer-l cache of kv head 0; heads lie `capacity` positions apart.
      auto layer_cache = [&](const std::vector<at::Tensor>& caches, int64_t r) {
        const at::Tensor& cache = caches[owner_[r]];
        return cache.data_ptr<float>() + l * cache.stride(0);
      };
      norm_rows(x_, layer.input_norm, rows, normed_);
      gemm(normed_, hidden_, rows, layer.qkv, qkv_, qkv_width, false);
      parallel_runs(rows, key_grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t position = position_[r];
          const int64_t capacity = keys[owner_[r]].size(2);
          store_keys(qkv_ + r * qkv_width, layer.qk_norm.data_ptr<float>(),
                     cos_ + position * head_dim_, signed_sin_ + position * head_dim_,
                     layer_cache(keys, r) + position * head_dim_,
                     layer_cache(values, r) + position * head_dim_, capacity);
        }
      });
      parallel_runs(rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          attend(qkv_ + r * qkv_width, layer_cache(keys, r), layer_cache(values, r),
                 keys[owner_[r]].size(2), position_[r] + 1, attended_ + r * attention_width);
        }
      });
      gemm(attended_, attention_width, rows, layer.o, x_, hidden_, true);
      norm_rows(x_, layer.post_attention_norm, rows, normed_);
      gemm(normed_, hidden_, rows, layer.gate_up, gate_up_, 2 * intermediate_, false);
      parallel_runs(rows, activation_grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const float* gate = gate_up_ + r * 2 * intermediate_;
          silu_times(gate, gate + intermediate_, intermediate_, activated_ + r * intermediate_);
        }
      });
      gemm(activated_, intermediate_, rows, layer.down, x_, hidden_, true);
    }
    norm_rows(x_, norm_, rows, normed_);
    return normed;
  }

 private:
  // Element-wise work is split between threads only in pieces big enough to pay for it.
  static int64_t rows_worth_a_thread(int64_t row_width) {
    constexpr int64_t kElementsWorthAThread = 32768;
    return std::max<int64_t>(1, kElementsWorthAThread / row_width);
  }

  void norm_rows(const float* x, const at::Tensor& weight, int64_t rows, float* out) const {
    const float* w = weight.data_ptr<float>();
    const int64_t grain = rows_worth_a_thread(hidden_);
    parallel_runs(rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        rms_norm(x + r * hidden_, w, hidden_, eps_, out + r * hidden_);
      }
    });
  }

  // Normalise and rotate a token's query and key heads in place, and store its key and value
  // heads in the cache (`keys`, `values`: the token's slot of kv head 0; heads are `capacity`
  // positions apart).
  void store_keys(float* qkv, const float* qk_norm, const float* cos, const float* signed_sin,
                  float* keys, float* values, int64_t capacity) const {
    for (int64_t h = 0; h < heads_ + kv_heads_; ++h) {
      float* head = qkv + h * head_dim_;
      rms_norm(head, qk_norm + h * head_dim_, head_dim_, eps_, head);
      rotate(head, cos, signed_sin, head_dim_);
    }
    for (int64_t g = 0; g < kv_heads_; ++g) {
      const int64_t offset = g * capacity * head_dim_;
      std::memcpy(keys + offset, qkv + (heads_ + g) * head_dim_, head_dim_ * sizeof(float));
      std::memcpy(values + offset, qkv + (heads_ + kv_heads_ + g) * head_dim_,
                  head_dim_ * sizeof(float));
    }
  }

  // A token's attention over the first `count` positions of its sequence's cache. `keys`,
  // `values`: that cache, [kv_heads][capacity][head_dim]; each kv head serves heads / kv_heads
  // query heads.
  void attend(const float* qkv, const float* keys, const float* values, int64_t capacity,
              int64_t count, float* out) const {
    const int64_t groups = heads_ / kv_heads_;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
    std::vector<float> weights(groups * count);
    for (int64_t g = 0; g < kv_heads_; ++g) {
      const float* head_keys = keys + g * capacity * head_dim_;
      const float* head_values = values + g * capacity * head_dim_;
      const float* query = qkv + g * groups * head_dim_;
      for (int64_t i = 0; i < count; ++i) {
        const float* key = head_keys + i * head_dim_;
        for (int64_t q = 0; q < groups; ++q) {
          Vec acc{};
          for (int64_t d = 0; d < head_dim_; d += kLanes) {
            acc += load(query + q * head_dim_ + d) * load(key + d);
          }
          weights[q * count + i] = sum(acc) * scale;
        }
      }
      for (int64_t q = 0; q < groups; ++q) softmax(weights.data() + q * count, count);
      // Position by position, so that the sums over head_dim run side by side (a chain of
      // dependent multiply-adds per output vector would wait on each one's latency).
      float* group_out = out + g * groups * head_dim_;
      std::fill(group_out, group_out + groups * head_dim_, 0.0f);
      for (int64_t i = 0; i < count; ++i) {
        const float* value = head_values + i * head_dim_;
        for (int64_t q = 0; q < groups; ++q) {
          const Vec weight = splat(weights[q * count + i]);
          float* head_out = group_out + q * head_dim_;
          for (int64_t d = 0; d < head_dim_; d += kLanes) {
            store(head_out + d, load(head_out + d) + weight * load(value + d));
          }
        }
      }
    }
  }

  int64_t heads_, kv_heads_, head_dim_, intermediate_, hidden_;
  float eps_;
  at::Tensor embed_, norm_;
  std::vector<Layer> layers_;
};

// A buffer of `numel` elements (bf16, float32 or int8) for panels, on 2 MB pages where Linux
// offers them: every decode step streams all weights, and 4 KB pages would cost a TLB miss per
// page (~5% of a step).
at::Tensor empty_panels(int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kChar,
              "panels are bf16, float32 or int8");
  const auto options = at::TensorOptions().dtype(dtype);
#if defined(__linux__)
  constexpr size_t kHugePage = 2 << 20;
  const size_t bytes = (numel * at::elementSize(dtype) + kHugePage - 1) / kHugePage * kHugePage;
  void* data = std::aligned_alloc(kHugePage, bytes);
  TORCH_CHECK(data != nullptr, "cannot allocate ", bytes, " bytes for the weights");
  madvise(data, bytes, MADV_HUGEPAGE);  // only a hint: without it the pages stay small
  return at::from_blob(data, {numel}, [](void* p) { std::free(p); }, options);
#else
  return at::empty({numel}, options);
#endif
}

// Writes a [n, k] weight (n a multiple of kPanelWidth) into `out` (n·k elements of its dtype,
// e.g. a slice of empty_panels) and returns the panels there: [n / kPanelWidth, k, kPanelWidth]
// of float32, or of bf16 with columns paired as load_panel_row reads them, or with
// `bf16_products` (bf16, k even) pair panels [n / kPanelWidth, k / 2, kPanelWidth] of int32.
at::Tensor pack(const at::Tensor& weight, const at::Tensor& out, bool bf16_products) {
  TORCH_CHECK(weight.dim() == 2, "a [n, k] weight");
  TORCH_CHECK(weight.size(0) % kPanelWidth == 0, "rows must be a multiple of ", kPanelWidth);
  TORCH_CHECK(out.scalar_type() == weight.scalar_type() && out.is_contiguous() &&
                  out.numel() == weight.numel(),
              "out must hold the weight");
  const int64_t panels = weight.size(0) / kPanelWidth;
  const int64_t depth = weight.size(1);
  if (weight.scalar_type() == at::kFloat && !bf16_products) {
    at::Tensor packed = out.view({panels, depth, kPanelWidth});
    packed.copy_(weight.view({panels, kPanelWidth, depth}).permute({0, 2, 1}));
    return packed;
  }
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "weights are bf16 or float32");
  if (bf16_products) {
    TORCH_CHECK(kBf16Products, "this CPU has no bf16 dot product (AVX512-BF16)");
    TORCH_CHECK(depth % 2 == 0, "bf16 products need an even input width");
    out.view({panels, depth / 2, kPanelWidth, 2})
        .copy_(weight.view({panels, kPanelWidth, depth / 2, 2}).permute({0, 2, 1, 3}));
    return out.view({panels, depth / 2, 2 * kPanelWidth}).view(at::kInt);
  }
  out.view({panels, depth, kLanes, 2})
      .copy_(weight.view({panels, 2, kLanes, depth}).permute({0, 3, 2, 1}));
  return out.view({panels, depth, kPanelWidth});
}

// Writes int8 weights [n, k] (n a multiple of kPanelWidth) and their output columns' fp32 scales
// [n] into `out` ((kScaleRows + k) · n bytes, e.g. a slice of empty_panels) and returns the
// panels there: [n / kPanelWidth, kScaleRows + k, kPanelWidth] of int8, each panel's scales in
// its first kScaleRows rows.
at::Tensor pack_int8(const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& out) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "an int8 [n, k] weight");
  TORCH_CHECK(weight.size(0) % kPanelWidth == 0, "rows must be a multiple of ", kPanelWidth);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == weight.size(0) &&
                  scales.scalar_type() == at::kFloat,
              "a float32 scale per row");
  const int64_t panels = weight.size(0) / kPanelWidth;
  const int64_t depth = weight.size(1);
  TORCH_CHECK(out.scalar_type() == at::kChar && out.is_contiguous() &&
                  out.numel() == panels * (kScaleRows + depth) * kPanelWidth,
              "out must hold the weight and its scales");
  at::Tensor packed = out.view({panels, kScaleRows + depth, kPanelWidth});
  packed.narrow(1, 0, kScaleRows)
      .view(at::kFloat)
      .view({panels, kPanelWidth})
      .copy_(scales.view({panels, kPanelWidth}));
  packed.narrow(1, kScaleRows, depth)
      .copy_(weight.view({panels, kPanelWidth, depth}).permute({0, 2, 1}));
  return packed;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& panels) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "float32 [m, k] input");
  TORCH_CHECK(x.size(1) == panel_depth(panels), "input width does not match the weight");
  at::Tensor input = x.contiguous();
  const int64_t width = panels.size(0) * kPanelWidth;
  at::Tensor y = at::empty({input.size(0), width}, input.options());
  gemm(input.data_ptr<float>(), input.size(1), input.size(0), panels, y.data_ptr<float>(), width,
       false);
  return y;
}

// What this build compiled to, from the compiler's predefined macros: the vector instructions
// the GEMM uses, the CPU features the compiler was told it may use, and the compiler itself.
pybind11::dict build_info() {
  const char* isa =
#if defined(__AVX512F__)
      "AVX-512";
#elif defined(__AVX2__)
      "AVX2";
#elif defined(__ARM_NEON)
      "NEON";
#else
      "generic";
#endif
  std::vector<std::string> features;
#if defined(__AVX2__)
  features.push_back("AVX2");
#endif
#if defined(__FMA__)
  features.push_back("FMA");
#endif
#if defined(__AVX512F__)
  features.push_back("AVX512F");
#endif
#if defined(__AVX512BW__)
  features.push_back("AVX512BW");
#endif
#if defined(__AVX512VNNI__)
  features.push_back("AVX512VNNI");
#endif
#if defined(__AVX512BF16__)
  features.push_back("AVX512BF16");
#endif
#if defined(__ARM_NEON)
  features.push_back("NEON");
#endif
#if defined(__ARM_FEATURE_FMA)
  features.push_back("ARM_FMA");
#endif
#if defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
  features.push_back("ARM_BF16");
#endif
#if defined(_OPENMP)
  features.push_back("OpenMP");
#endif
  const char* compiler =
#if defined(__clang__)
      "clang " __clang_version__;
#elif defined(__GNUC__)
      "gcc " __VERSION__;
#else
      "unknown";
#endif
  pybind11::dict info;
  info["isa"] = isa;
  info["features"] = features;
  info["compiler"] = compiler;
  info["vector_width"] = kLanes;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("PANEL_WIDTH") = kPanelWidth;
  m.attr("VECTOR_WIDTH") = kLanes;
  m.attr("BF16_PRODUCTS") = kBf16Products;
  m.attr("OPENMP_LOOPS") = openmp_loops();
  m.def("set_threads", &set_threads,
        "The pool's thread count for the whole process (0: torch's, per calling thread).");
  m.def("threads", &kernel_threads, "How many threads the kernels' loops run on.");
  m.def("build_info", &build_info, "The ISA, CPU features and compiler this build targets.");
  m.def("empty_panels", &empty_panels, "A buffer for panels, on huge pages where possible.");
  m.def("pack", &pack, "Write a bf16 [n, k] weight into `out` as panels for `linear`.",
        pybind11::arg("weight"), pybind11::arg("out"), pybind11::arg("bf16_products") = false);
  m.def("pack_int8", &pack_int8, "Write int8 [n, k] weights and [n] scales into `out` as panels.",
        pybind11::arg("weight"), pybind11::arg("scales"), pybind11::arg("out"));
  m.attr("INT8_SCALE_ROWS") = kScaleRows;
  // Both release the GIL, so that other Python threads (an asyncio server's) run meanwhile.
  m.def("linear", &linear, "x [m, k] float32 times packed W^T.",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<Qwen3Forward>(m, "Qwen3Forward")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, double, at::Tensor,
                          std::vector<std::vector<at::Tensor>>, at::Tensor>())
      .def("forward", &Qwen3Forward::forward,
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
