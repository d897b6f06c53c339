// bnlab's native CPU batch norm: the math of bnlab/functional/fast.py as fused C++ loops.
//
// Every input is read as one of two memory orders (no copy for contiguous or channels-last):
//   rows  (M, C): channels innermost, (N, C) and channels-last of any rank
//   ncl   (N, C, L): contiguous NC*, one run of L values per (n, c)
// Statistics in one read of x: each block of a few KB gets a corrected two-pass (block mean mb,
// then Σd and Σd² of d = x - mb, while the block is still in the L1/L2 cache), in float32 for
// half inputs and in the input's dtype otherwise; blocks are merged in double with Chan et
// al.'s pairwise update. Blocks and the merge order are fixed by the shape, so the result does
// not depend on the number of threads.
//
// The autograd function saves x, γ, μ and invstd; its backward is two passes:
//   Σdy, Σdy·(x - μ), then ∂x = s·dy + k·(x - μ) + c per element.
// Every pass walks memory in order (strided per-channel walks over short runs cost up to 2x).
// Outputs of 1 MiB or more take their memory from a cache of freed blocks (OutputCache);
// float32 outputs larger than the last-level cache are written with non-temporal stores.
// With create_graph=True (or a batched gradient under vmap) the backward is recomputed from x
// with ATen operations, so higher derivatives are exact.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BNLAB_STREAM 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kRowBlock = 128;       // backward sums: rows per partial sum (rows layout)
constexpr int64_t kGrainElems = 1 << 15;  // smallest piece of work worth a thread
constexpr int64_t kRunGroup = 256;        // backward sums: fewest values per partial (ncl)

struct Layout {
  bool rows;
  int64_t n;  // rows: M; ncl: N
  int64_t c;
  int64_t l;  // rows: 1
};

// x, or a contiguous copy of it, and how its memory is read.
std::pair<Tensor, Layout> canonical(const Tensor& x) {
  const int64_t c = x.size(1);
  const int64_t numel = x.numel();
  TORCH_CHECK(numel > 0 && c > 0, "bnlab native batch norm: empty input ", x.sizes());
  if (x.dim() == 2) {
    return {x.is_contiguous() ? x : x.contiguous(), {true, x.size(0), c, 1}};
  }
  if (x.is_contiguous()) {
    return {x, {false, x.size(0), c, numel / (x.size(0) * c)}};
  }
  if (x.movedim(1, -1).is_contiguous()) {
    return {x, {true, numel / c, c, 1}};
  }
  return {x.contiguous(), {false, x.size(0), c, numel / (x.size(0) * c)}};
}

// t in exactly the memory order of `like` (a gradient may come with other strides).
Tensor same_strides(const Tensor& t, const Tensor& like) {
  if (t.strides() == like.strides()) {
    return t;
  }
  Tensor out = at::empty_like(like, t.options());
  out.copy_(t);
  return out;
}

int64_t grain(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item));
}

// ---------------------------------------------------------------- output cache
//
// glibc serves every block above its mmap threshold (at most 32 MB) with fresh pages from the
// OS and returns them on free, so each new 51 MB output of a (64, 64, 56, 56) step pays some
// 12,000 page faults on first touch: more time than the kernel's arithmetic. Outputs of at
// least kCacheMinBytes are therefore taken from a cache of freed blocks, as PyTorch's CUDA
// allocator does. The tensors are ordinary resizable CPU tensors; only their memory, once
// freed, waits in the cache (at most `limit` bytes, which 0 disables) for the next output of
// the same rounded size.
constexpr size_t kCacheMinBytes = size_t(1) << 20;
constexpr size_t kCacheRound = size_t(2) << 20;  // sizes are rounded up to 2 MiB

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t size = (n + kCacheRound - 1) / kCacheRound * kCacheRound;
    void* p = nullptr;
    bool cached = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cached = n >= kCacheMinBytes && limit_ > 0;
      auto it = cached ? free_.find(size) : free_.end();
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_ -= size;
        ++hits_;
      } else if (cached) {
        ++misses_;
      }
    }
    if (!cached) {
      return c10::GetCPUAllocator()->allocate(n);
    }
    if (p == nullptr) {
      p = c10::alloc_cpu(size);
    }
    return {p, new Block{p, size, this}, &OutputCache::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    limit_ = bytes;
    trim_locked(limit_);
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mu_);
    trim_locked(0);
  }

  std::unordered_map<std::string, int64_t> info() {
    std::lock_guard<std::mutex> lock(mu_);
    return {{"cached_bytes", int64_t(cached_)},
            {"limit_bytes", int64_t(limit_)},
            {"hits", hits_},
            {"misses", misses_}};
  }

 private:
  struct Block {
    void* p;
    size_t size;
    OutputCache* owner;
  };

  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    b->owner->put(b->p, b->size);
    delete b;
  }

  // Keeps a freed block, evicting blocks of other sizes if the cache is full: the sizes in use
  // change (another model, another input size), and the newest are the likeliest reused.
  void put(void* p, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.begin(); cached_ + size > limit_ && it != free_.end(); ++it) {
        while (it->first != size && cached_ + size > limit_ && !it->second.empty()) {
          c10::free_cpu(it->second.back());
          it->second.pop_back();
          cached_ -= it->first;
        }
      }
      if (cached_ + size <= limit_) {
        free_[size].push_back(p);
        cached_ += size;
        return;
      }
    }
    c10::free_cpu(p);
  }

  // Frees cached blocks until at most `keep` bytes are left.
  void trim_locked(size_t keep) {
    for (auto& [size, blocks] : free_) {
      while (cached_ > keep && !blocks.empty()) {
        c10::free_cpu(blocks.back());
        blocks.pop_back();
        cached_ -= size;
      }
    }
  }

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
  size_t limit_ = size_t(512) << 20;  // bnlab.functional.native sets it from the environment
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors may outlive static destruction at exit and still free into it.
OutputCache& output_cache() {
  static auto* cache = new OutputCache();
  return *cache;
}

// An uninitialized tensor with x's sizes, strides and dtype (x is dense), from the cache.
Tensor empty_output(const Tensor& x) {
  return Tensor(at::detail::empty_strided_generic(x.sizes(), x.strides(), &output_cache(),
                                                  c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                  x.scalar_type()));
}

// ---------------------------------------------------------------- few channels
//
// Rows of few channels (channels-last with C = 6 or 16, as in the LeNet) make the per-row loop
// over C too short to vectorize. Those sweeps run over tiles of tile_rows(C) rows instead, with
// the per-channel parameters repeated across the tile, so that the inner loop is P = rows·C
// contiguous values (P >= 64; rows a multiple of 8). Each element's formula is unchanged.
constexpr int64_t kSmallC = 32;

int64_t tile_rows(int64_t C) {
  return 8 * ((64 + 8 * C - 1) / (8 * C));
}

// v (C values, or zeros if null) repeated `rows` times
template <typename acc_t>
std::vector<acc_t> tiled(const acc_t* v, int64_t C, int64_t rows) {
  std::vector<acc_t> out(rows * C);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = v ? v[c] : acc_t(0);
  }
  return out;
}

// f(first element, length) for each tile of P values of a rows layout, in parallel
template <typename F>
void for_each_tile(const Layout& L, int64_t P, F f) {
  const int64_t total = L.n * L.c;
  const int64_t tiles = (total + P - 1) / P;
  at::parallel_for(0, tiles, grain(P), [&](int64_t a, int64_t b) {
    for (int64_t g = a; g < b; ++g) {
      f(g * P, std::min(P, total - g * P));
    }
  });
}

// ---------------------------------------------------------------- per-channel sums
//
// The backward's sums: for every channel, Σ f(x, y, channel) over its n·l values, as `acc_t`,
// where y is a second tensor in x's layout and f returns two terms (a, b), summed into out_a
// and out_b.
template <typename scalar_t, typename acc_t, typename F>
void channel_sums(const scalar_t* x, const scalar_t* y, const Layout& L, F f, acc_t* out_a,
                  acc_t* out_b) {
  const int64_t C = L.c;
  if (L.rows) {
    const int64_t blocks = (L.n + kRowBlock - 1) / kRowBlock;
    std::vector<acc_t> pa(blocks * C), pb(blocks * C);
    at::parallel_for(0, blocks, grain(kRowBlock * C), [&](int64_t b0, int64_t b1) {
      for (int64_t k = b0; k < b1; ++k) {
        acc_t* a = pa.data() + k * C;
        acc_t* b = pb.data() + k * C;
        std::fill(a, a + C, acc_t(0));
        std::fill(b, b + C, acc_t(0));
        const int64_t r1 = std::min(L.n, (k + 1) * kRowBlock);
        for (int64_t r = k * kRowBlock; r < r1; ++r) {
          const scalar_t* xr = x + r * C;
          const scalar_t* yr = y + r * C;
          for (int64_t c = 0; c < C; ++c) {
            auto [ta, tb] = f(acc_t(xr[c]), acc_t(yr[c]), c);
            a[c] += ta;
            b[c] += tb;
          }
        }
      }
    });
    std::fill(out_a, out_a + C, acc_t(0));
    std::fill(out_b, out_b + C, acc_t(0));
    for (int64_t k = 0; k < blocks; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        out_a[c] += pa[k * C + c];
        out_b[c] += pb[k * C + c];
      }
    }
    return;
  }
  // Tasks are (block of runs, channel) in memory order, so x and y stream through; their
  // partial sums are added per channel in block order.
  const int64_t N = L.n, Lw = L.l;
  const int64_t nb = std::max<int64_t>(1, kRunGroup / Lw);
  const int64_t blocks = (N + nb - 1) / nb;
  std::vector<acc_t> pa(blocks * C), pb(blocks * C);
  at::parallel_for(0, blocks * C, grain(nb * Lw), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k = t / C, c = t % C;
      acc_t sa = 0, sb = 0;
      for (int64_t i = k * nb; i < std::min(N, (k + 1) * nb); ++i) {
        const scalar_t* xr = x + (i * C + c) * Lw;
        const scalar_t* yr = y + (i * C + c) * Lw;
        acc_t ra = 0, rb = 0;
        for (int64_t j = 0; j < Lw; ++j) {
          auto [ta, tb] = f(acc_t(xr[j]), acc_t(yr[j]), c);
          ra += ta;
          rb += tb;
        }
        sa += ra;
        sb += rb;
      }
      pa[t] = sa;
      pb[t] = sb;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    acc_t sa = 0, sb = 0;
    for (int64_t k = 0; k < blocks; ++k) {
      sa += pa[k * C + c];
      sb += pb[k * C + c];
    }
    out_a[c] = sa;
    out_b[c] = sb;
  }
}

// The backward's sums for rows of few channels: Σdy and Σdy·(x - μ) per channel, over tiles
// (see tile_rows), in blocks of whole tiles whose partial sums are added in block order.
template <typename scalar_t, typename acc_t>
void row_sums_small_c(const scalar_t* x, const scalar_t* g, const Layout& L, const acc_t* mean,
                      acc_t* sum_g, acc_t* sum_g_xc) {
  const int64_t C = L.c, kt = tile_rows(C), P = kt * C;
  const int64_t rows = kt * std::max<int64_t>(1, kRowBlock / kt);  // a block: whole tiles
  const int64_t blocks = (L.n + rows - 1) / rows;
  std::vector<acc_t> pa(blocks * C, acc_t(0)), pb(blocks * C, acc_t(0));
  const std::vector<acc_t> tm = tiled(mean, C, kt);
  at::parallel_for(0, blocks, grain(rows * C), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> ta(P), tb(P);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rows, r1 = std::min(L.n, r0 + rows);
      const int64_t tiled_end = r0 + (r1 - r0) / kt * kt;
      std::fill(ta.begin(), ta.end(), acc_t(0));
      std::fill(tb.begin(), tb.end(), acc_t(0));
      for (int64_t r = r0; r < tiled_end; r += kt) {
        const scalar_t *xr = x + r * C, *gr = g + r * C;
        for (int64_t j = 0; j < P; ++j) {
          const acc_t gv = acc_t(gr[j]);
          ta[j] += gv;
          tb[j] += gv * (acc_t(xr[j]) - tm[j]);
        }
      }
      acc_t* a = pa.data() + blk * C;
      acc_t* b = pb.data() + blk * C;
      for (int64_t j = 0; j < P; ++j) {
        a[j % C] += ta[j];
        b[j % C] += tb[j];
      }
      for (int64_t r = tiled_end; r < r1; ++r) {
        const scalar_t *xr = x + r * C, *gr = g + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t gv = acc_t(gr[c]);
          a[c] += gv;
          b[c] += gv * (acc_t(xr[c]) - mean[c]);
        }
      }
    }
  });
  std::fill(sum_g, sum_g + C, acc_t(0));
  std::fill(sum_g_xc, sum_g_xc + C, acc_t(0));
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int64_t c = 0; c < C; ++c) {
      sum_g[c] += pa[blk * C + c];
      sum_g_xc[c] += pb[blk * C + c];
    }
  }
}

// ---------------------------------------------------------------- per-channel moments

// Values per two-pass block. Contiguous: 8 KB of float32, the runs of one channel. Channels-
// last: 128 KB (L2-resident), because every block costs one float64 merge per channel.
constexpr int64_t kBlockElems = 2048;
constexpr int64_t kRowBlockElems = 1 << 15;
constexpr int64_t kBlocksPerTask = 4;  // rows layout: blocks merged in order by one task

// count, mean and M2 = Σ(x - mean)² of a set of values
struct Moments {
  double n = 0, mean = 0, m2 = 0;

  // Chan, Golub & LeVeque's pairwise update: exact in exact arithmetic, and stable because it
  // only adds squares and never subtracts two sums of squares.
  void merge(double nb, double mean_b, double m2_b) {
    if (nb == 0) {
      return;
    }
    const double total = n + nb, d = mean_b - mean;
    mean += d * (nb / total);
    m2 += m2_b + d * d * (n * nb / total);
    n = total;
  }

  // a block's corrected two-pass sums: its provisional mean mb, then Σ(x - mb) and Σ(x - mb)²
  template <typename acc_t>
  void merge_block(int64_t nb, acc_t mb, acc_t sum_d, acc_t sum_d2) {
    const double k = double(nb), a = double(sum_d);
    merge(k, double(mb) + a / k, std::max(double(sum_d2) - a * a / k, 0.0));
  }
};

// Moments of C channels that share one count (rows of a channels-last block), as arrays.
struct RowMoments {
  double n = 0;
  std::vector<double> mean, m2;

  explicit RowMoments(int64_t C) : mean(C, 0.0), m2(C, 0.0) {}

  // Moments::merge for every channel at once
  void merge(double nb, const double* mean_b, const double* m2_b) {
    if (nb == 0) {
      return;
    }
    const double total = n + nb, f1 = nb / total, f2 = n * nb / total;
    for (size_t c = 0; c < mean.size(); ++c) {
      const double d = mean_b[c] - mean[c];
      mean[c] += d * f1;
      m2[c] += m2_b[c] + d * d * f2;
    }
    n = total;
  }

  // Moments::merge_block for every channel at once
  template <typename acc_t>
  void merge_block(int64_t nb, const acc_t* mb, const acc_t* sum_d, const acc_t* sum_d2) {
    const double k = double(nb), inv_k = 1.0 / k, total = n + k, f1 = k / total,
                 f2 = n * k / total;
    for (size_t c = 0; c < mean.size(); ++c) {
      const double a = double(sum_d[c]);
      const double block_mean = double(mb[c]) + a * inv_k;
      const double block_m2 = std::max(double(sum_d2[c]) - a * a * inv_k, 0.0);
      const double d = block_mean - mean[c];
      mean[c] += d * f1;
      m2[c] += block_m2 + d * d * f2;
    }
    n = total;
  }
};

// Per-channel Moments of x (one read of memory: the second pass of each block hits the cache).
template <typename scalar_t, typename acc_t>
std::vector<Moments> channel_moments(const scalar_t* x, const Layout& L) {
  const int64_t C = L.c;
  std::vector<Moments> out(C);
  if (L.rows) {
    // A block is `rows` consecutive rows; a task merges kBlocksPerTask blocks in order. All
    // channels of a block share its count, so the merge's divisions are once per block and
    // the per-channel update is a vectorizable multiply-add (RowMoments).
    const int64_t rows = std::clamp<int64_t>(kRowBlockElems / C, 8, 1024);
    const int64_t span = rows * kBlocksPerTask;
    const int64_t tasks = (L.n + span - 1) / span;
    std::vector<RowMoments> partial(tasks, RowMoments(C));
    const bool small = C < kSmallC;
    const int64_t kt = tile_rows(C), P = kt * C;
    at::parallel_for(0, tasks, grain(span * C), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> a(C), b(C), m(C);
      std::vector<acc_t> ts(small ? P : 0), tm(ts.size()), ta(ts.size()), tb(ts.size());
      // adds the per-position sums of a tile into per-channel sums
      auto fold = [C](const std::vector<acc_t>& tile, std::vector<acc_t>& into) {
        for (size_t j = 0; j < tile.size(); ++j) into[j % C] += tile[j];
      };
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t end = std::min(L.n, (t + 1) * span);
        for (int64_t r0 = t * span; r0 < end; r0 += rows) {
          const int64_t r1 = std::min(end, r0 + rows);
          // few channels: whole tiles first, summed per tile position, then the rest
          const int64_t tiled_end = small ? r0 + (r1 - r0) / kt * kt : r0;
          std::fill(m.begin(), m.end(), acc_t(0));
          if (small) {
            std::fill(ts.begin(), ts.end(), acc_t(0));
            for (int64_t r = r0; r < tiled_end; r += kt) {
              const scalar_t* xr = x + r * C;
              for (int64_t j = 0; j < P; ++j) ts[j] += acc_t(xr[j]);
            }
            fold(ts, m);
          }
          for (int64_t r = tiled_end; r < r1; ++r) {
            const scalar_t* xr = x + r * C;
            for (int64_t c = 0; c < C; ++c) m[c] += acc_t(xr[c]);
          }
          const acc_t k = acc_t(r1 - r0);
          for (int64_t c = 0; c < C; ++c) m[c] /= k;
          std::fill(a.begin(), a.end(), acc_t(0));
          std::fill(b.begin(), b.end(), acc_t(0));
          if (small) {
            for (int64_t j = 0; j < P; ++j) tm[j] = m[j % C];
            std::fill(ta.begin(), ta.end(), acc_t(0));
            std::fill(tb.begin(), tb.end(), acc_t(0));
            for (int64_t r = r0; r < tiled_end; r += kt) {
              const scalar_t* xr = x + r * C;
              for (int64_t j = 0; j < P; ++j) {
                const acc_t d = acc_t(xr[j]) - tm[j];
                ta[j] += d;
                tb[j] += d * d;
              }
            }
            fold(ta, a);
            fold(tb, b);
          }
          for (int64_t r = tiled_end; r < r1; ++r) {
            const scalar_t* xr = x + r * C;
            for (int64_t c = 0; c < C; ++c) {
              const acc_t d = acc_t(xr[c]) - m[c];
              a[c] += d;
              b[c] += d * d;
            }
          }
          partial[t].merge_block(r1 - r0, m.data(), a.data(), b.data());
        }
      }
    });
    RowMoments total(C);
    for (const RowMoments& p : partial) total.merge(p.n, p.mean.data(), p.m2.data());
    for (int64_t c = 0; c < C; ++c) out[c] = {total.n, total.mean[c], total.m2[c]};
    return out;
  }
  // A block is the runs of one channel in `nb` consecutive samples (one run when runs are
  // long); tasks are (block, channel) in memory order, so that x streams through.
  const int64_t N = L.n, Lw = L.l;
  const int64_t nb = std::max<int64_t>(1, kBlockElems / Lw);
  const int64_t blocks = (N + nb - 1) / nb;
  std::vector<Moments> partial(blocks * C);
  at::parallel_for(0, blocks * C, grain(nb * Lw), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % C, i0 = (t / C) * nb, i1 = std::min(N, i0 + nb);
      acc_t sum = 0;
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* xr = x + (i * C + c) * Lw;
        acc_t r = 0;
        for (int64_t j = 0; j < Lw; ++j) r += acc_t(xr[j]);
        sum += r;
      }
      const int64_t k = (i1 - i0) * Lw;
      const acc_t mb = sum / acc_t(k);
      acc_t a = 0, b = 0;
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* xr = x + (i * C + c) * Lw;
        acc_t ra = 0, rb = 0;
        for (int64_t j = 0; j < Lw; ++j) {
          const acc_t d = acc_t(xr[j]) - mb;
          ra += d;
          rb += d * d;
        }
        a += ra;
        b += rb;
      }
      partial[t].merge_block(k, mb, a, b);
    }
  });
  for (int64_t t = 0; t < blocks * C; ++t) {
    const Moments& p = partial[t];
    out[t % C].merge(p.n, p.mean, p.m2);
  }
  return out;
}

// ---------------------------------------------------------------- elementwise outputs
//
// The two per-element formulas, with explicit fma so that the streamed and the plain loops
// round identically: y = (x - m)·s + t, and ∂x = s·dy + (k·(x - m) + t).
template <typename T>
inline T affine_at(T x, T m, T s, T t) {
  return std::fma(x - m, s, t);
}

template <typename T>
inline T dx_at(T g, T x, T m, T s, T k, T t) {
  return std::fma(s, g, std::fma(k, x - m, t));
}

// float32 outputs of kStreamMinBytes or more (larger than the last-level cache, and larger
// than any later reader could find in it) are written with non-temporal stores: a normal
// store first reads the line it overwrites, a third of an eval pass's memory traffic.
// A fixed size, not sysconf's L3 size: virtual machines misreport it (320 MB here, for a 32 MB
// cache).
constexpr int64_t kStreamMinBytes = int64_t(48) << 20;

// Whether a float32 output in layout L is streamed.
bool streams(const Layout& L) {
#ifdef BNLAB_STREAM
  // rows of a multiple of 8 channels keep every row 32-byte aligned (outputs are 64-aligned)
  const int64_t bytes = L.n * L.c * L.l * int64_t(sizeof(float));
  return bytes >= kStreamMinBytes && (!L.rows || L.c % 8 == 0);
#else
  return false;
#endif
}

// Parameters of a streamed span: one value for all of it (an ncl run) or one per element (a
// row of channels).
struct Splat {
  float v;
  float at(int64_t) const { return v; }
#ifdef BNLAB_STREAM
  __m256 vec(int64_t) const { return _mm256_set1_ps(v); }
#endif
};

struct PerElement {
  const float* p;
  float at(int64_t j) const { return p[j]; }
#ifdef BNLAB_STREAM
  __m256 vec(int64_t j) const { return _mm256_loadu_ps(p + j); }
#endif
};

template <typename P>
void stream_affine(const float* x, float* o, int64_t n, P m, P s, P t) {
  int64_t j = 0;
#ifdef BNLAB_STREAM
  for (; j < n && (reinterpret_cast<uintptr_t>(o + j) & 31) != 0; ++j) {
    o[j] = affine_at(x[j], m.at(j), s.at(j), t.at(j));
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + j), m.vec(j));
    _mm256_stream_ps(o + j, _mm256_fmadd_ps(d, s.vec(j), t.vec(j)));
  }
#endif
  for (; j < n; ++j) {
    o[j] = affine_at(x[j], m.at(j), s.at(j), t.at(j));
  }
}

template <typename P>
void stream_dx(const float* g, const float* x, float* o, int64_t n, P m, P s, P k, P t) {
  int64_t j = 0;
#ifdef BNLAB_STREAM
  for (; j < n && (reinterpret_cast<uintptr_t>(o + j) & 31) != 0; ++j) {
    o[j] = dx_at(g[j], x[j], m.at(j), s.at(j), k.at(j), t.at(j));
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + j), m.vec(j));
    const __m256 inner = _mm256_fmadd_ps(k.vec(j), d, t.vec(j));
    _mm256_stream_ps(o + j, _mm256_fmadd_ps(s.vec(j), _mm256_loadu_ps(g + j), inner));
  }
#endif
  for (; j < n; ++j) {
    o[j] = dx_at(g[j], x[j], m.at(j), s.at(j), k.at(j), t.at(j));
  }
}

// Makes a thread's streamed stores visible before the parallel region ends.
inline void stream_fence() {
#ifdef BNLAB_STREAM
  _mm_sfence();
#endif
}

// The streamed sweeps, in parallel over contiguous spans in memory order:
// body(first, count, channel) for each row of all C channels (rows layout; channel -1, the
// parameters are per element) or each run of one channel in one sample (ncl); each thread
// fences its stores before it leaves the parallel region. (The plain loops stay written out:
// through this driver the compiler made small-C channels-last eval 7-10 % slower.)
template <typename F>
void for_each_streamed_span(const Layout& L, F body) {
  const int64_t C = L.c;
  if (L.rows) {
    at::parallel_for(0, L.n, grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) body(r * C, C, int64_t(-1));
      stream_fence();
    });
    return;
  }
  const int64_t Lw = L.l;
  at::parallel_for(0, L.n * C, grain(Lw), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) body(p * Lw, Lw, p % C);
    stream_fence();
  });
}

// out = (x - m)·s + t per channel (m, s, t in acc_t), or x·s + t without m; out may have
// another dtype than the accumulator. Training centers first: x·s + (β - μ·s) cancels when
// |μ| ≫ σ (s = γ/σ is then large), (x - μ)·s does not. Eval uses x·s + t, as PyTorch does
// and as a folded layer must.
template <bool centered, typename scalar_t, typename acc_t>
void apply_affine(const scalar_t* x, const Layout& L, const acc_t* m, const acc_t* s,
                  const acc_t* t, scalar_t* out) {
  const int64_t C = L.c;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (streams(L)) {
      const std::vector<float> zeros(centered ? 0 : C, 0.0f);
      const float* mm = centered ? m : zeros.data();
      for_each_streamed_span(L, [&](int64_t i, int64_t n, int64_t c) {
        if (c < 0) {
          stream_affine(x + i, out + i, n, PerElement{mm}, PerElement{s}, PerElement{t});
        } else {
          stream_affine(x + i, out + i, n, Splat{mm[c]}, Splat{s[c]}, Splat{t[c]});
        }
      });
      return;
    }
  }
  if (L.rows && C < kSmallC) {
    const int64_t k = tile_rows(C);
    const auto M = tiled<acc_t>(centered ? m : nullptr, C, k), S = tiled(s, C, k),
               T = tiled(t, C, k);
    for_each_tile(L, k * C, [&](int64_t i0, int64_t len) {
      const scalar_t* xr = x + i0;
      scalar_t* o = out + i0;
      for (int64_t j = 0; j < len; ++j) {
        o[j] = scalar_t(affine_at(acc_t(xr[j]), M[j], S[j], T[j]));
      }
    });
    return;
  }
  if (L.rows) {
    at::parallel_for(0, L.n, grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = x + r * C;
        scalar_t* o = out + r * C;
        for (int64_t c = 0; c < C; ++c) {
          o[c] = scalar_t(affine_at(acc_t(xr[c]), centered ? m[c] : acc_t(0), s[c], t[c]));
        }
      }
    });
    return;
  }
  const int64_t Lw = L.l;
  at::parallel_for(0, L.n * C, grain(Lw), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const acc_t mc = centered ? m[p % C] : acc_t(0), sc = s[p % C], sh = t[p % C];
      const scalar_t* xr = x + p * Lw;
      scalar_t* o = out + p * Lw;
      for (int64_t j = 0; j < Lw; ++j) {
        o[j] = scalar_t(affine_at(acc_t(xr[j]), mc, sc, sh));
      }
    }
  });
}

// dx = s·dy + k·(x - m) + t per channel (the backward's second sweep); see apply_affine.
template <typename scalar_t, typename acc_t>
void apply_dx(const scalar_t* gp, const scalar_t* xp, const Layout& L, const acc_t* mp,
              const acc_t* s, const acc_t* k, const acc_t* t, scalar_t* op) {
  const int64_t C = L.c;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (streams(L)) {
      for_each_streamed_span(L, [&](int64_t i, int64_t n, int64_t c) {
        if (c < 0) {
          stream_dx(gp + i, xp + i, op + i, n, PerElement{mp}, PerElement{s}, PerElement{k},
                    PerElement{t});
        } else {
          stream_dx(gp + i, xp + i, op + i, n, Splat{mp[c]}, Splat{s[c]}, Splat{k[c]},
                    Splat{t[c]});
        }
      });
      return;
    }
  }
  if (L.rows && C < kSmallC) {
    const int64_t rows = tile_rows(C);
    const auto M = tiled(mp, C, rows), S = tiled(s, C, rows), K = tiled(k, C, rows),
               T = tiled(t, C, rows);
    for_each_tile(L, rows * C, [&](int64_t i0, int64_t len) {
      const scalar_t *g = gp + i0, *xr = xp + i0;
      scalar_t* o = op + i0;
      for (int64_t j = 0; j < len; ++j) {
        o[j] = scalar_t(dx_at(acc_t(g[j]), acc_t(xr[j]), M[j], S[j], K[j], T[j]));
      }
    });
    return;
  }
  if (L.rows) {
    at::parallel_for(0, L.n, grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = r * C + c;
          op[i] = scalar_t(dx_at(acc_t(gp[i]), acc_t(xp[i]), mp[c], s[c], k[c], t[c]));
        }
      }
    });
    return;
  }
  const int64_t Lw = L.l;
  at::parallel_for(0, L.n * C, grain(Lw), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C;
      const acc_t sc = s[c], kc = k[c], tc = t[c], mc = mp[c];
      for (int64_t j = p * Lw; j < (p + 1) * Lw; ++j) {
        op[j] = scalar_t(dx_at(acc_t(gp[j]), acc_t(xp[j]), mc, sc, kc, tc));
      }
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// t in dtype `dt` (and contiguous), with no dispatcher call when it already is: on small
// inputs the ~15 no-op .to()/.contiguous() calls of a step are a measurable share of it.
Tensor as_dtype(const Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt ? t : t.to(dt);
}

Tensor as_acc(const Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc && t.is_contiguous() ? t : t.to(acc).contiguous();
}

// A per-channel tensor as a contiguous acc_t vector, or an empty one for "absent" (read
// through its data pointer only, so no detach is needed).
Tensor per_channel(const c10::optional<Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) {
    return Tensor();
  }
  return as_acc(*t, acc);
}

// ---------------------------------------------------------------- forward / backward

// (y, mean, var, invstd) for training.
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_kernel(const Tensor& x_in,
                                                          const c10::optional<Tensor>& weight,
                                                          const c10::optional<Tensor>& bias,
                                                          double eps) {
  auto view = canonical(x_in);
  const Tensor x = view.first;
  const Layout L = view.second;
  const auto acc = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  Tensor mean = at::empty({L.c}, opts), var = at::empty({L.c}, opts);
  Tensor invstd = at::empty({L.c}, opts);
  Tensor y = empty_output(x);
  Tensor w = per_channel(weight, acc), b = per_channel(bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t C = L.c;
    const std::vector<Moments> mom = channel_moments<scalar_t, acc_t>(xp, L);
    std::vector<acc_t> m0(C), scale(C), shift(C);
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      m0[c] = acc_t(mom[c].mean);
      const acc_t delta = acc_t(mom[c].mean - double(m0[c]));  // the rounding error of m0
      const acc_t v = acc_t(mom[c].m2 / mom[c].n);
      mp[c] = m0[c];
      vp[c] = v;
      ip[c] = acc_t(1) / std::sqrt(v + acc_t(eps));
      scale[c] = wp ? wp[c] * ip[c] : ip[c];
      // y = (x - μ)·s + β = (x - m0)·s + (β - δ·s): x - m0 is exact where the rounded μ is not
      shift[c] = (bp ? bp[c] : acc_t(0)) - delta * scale[c];
    }
    apply_affine<true, scalar_t, acc_t>(xp, L, m0.data(), scale.data(), shift.data(),
                                        y.data_ptr<scalar_t>());
  });
  return {y, mean, var, invstd};
}

// (dx, dweight, dbias) with dweight/dbias in the accumulation dtype.
std::tuple<Tensor, Tensor, Tensor> backward_kernel(const Tensor& dy_in, const Tensor& x_in,
                                                   const Tensor& mean, const Tensor& invstd,
                                                   const Tensor& weight) {
  auto view = canonical(x_in);
  const Tensor x = view.first;
  const Layout L = view.second;
  Tensor dy = same_strides(as_dtype(dy_in, x.scalar_type()), x);
  const auto acc = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  Tensor dw = at::empty({L.c}, opts), db = at::empty({L.c}, opts);
  Tensor dx = empty_output(x);
  Tensor w = weight.defined() ? as_acc(weight, acc) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = L.c;
    const acc_t n = acc_t(L.n * L.l);
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* ip = invstd.const_data_ptr<acc_t>();
    const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    acc_t* dwp = dw.data_ptr<acc_t>();
    acc_t* dbp = db.data_ptr<acc_t>();
    std::vector<acc_t> sum_dy_xc(C);
    if (L.rows && C < kSmallC) {
      row_sums_small_c<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(),
                                        dy.const_data_ptr<scalar_t>(), L, mp, dbp,
                                        sum_dy_xc.data());
    } else {  // x is the first argument, dy the second
      channel_sums<scalar_t, acc_t>(
          x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), L,
          [mp](acc_t v, acc_t g, int64_t c) {
            return std::pair<acc_t, acc_t>(g, g * (v - mp[c]));
          },
          dbp, sum_dy_xc.data());
    }
    // ∂x = s·dy + k·(x - μ) + c0, centered for the reason apply_affine gives
    std::vector<acc_t> s(C), k(C), t(C);
    for (int64_t c = 0; c < C; ++c) {
      s[c] = wp ? wp[c] * ip[c] : ip[c];
      k[c] = -s[c] * ip[c] * ip[c] * sum_dy_xc[c] / n;
      const acc_t c0 = -s[c] * dbp[c] / n;
      t[c] = c0;
      dwp[c] = sum_dy_xc[c] * ip[c];
    }
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* op = dx.data_ptr<scalar_t>();
    apply_dx<scalar_t, acc_t>(gp, xp, L, mp, s.data(), k.data(), t.data(), op);
  });
  return {dx, dw, db};
}

// The same backward from x with differentiable ATen operations (create_graph=True).
std::tuple<Tensor, Tensor, Tensor> backward_differentiable(const Tensor& dy, const Tensor& x,
                                                           const Tensor& weight, double eps) {
  const auto acc = acc_type(x.scalar_type());
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  const double n = double(x.numel() / x.size(1));
  Tensor xa = x.to(acc), g = dy.to(acc);
  auto [var, mean] = at::var_mean(xa, dims, /*correction=*/0, /*keepdim=*/true);
  Tensor invstd = (var + eps).rsqrt();
  Tensor xhat = (xa - mean) * invstd;
  Tensor db = g.sum(dims);
  Tensor dw = (g * xhat).sum(dims);
  Tensor s = weight.defined() ? invstd * weight.to(acc).view(shape) : invstd;
  Tensor dx = s * (g - db.view(shape) / n - xhat * dw.view(shape) / n);
  return {dx.to(x.scalar_type()), dw, db};
}

struct NativeBatchNorm : public torch::autograd::Function<NativeBatchNorm> {
  // An absent weight or bias is a nullopt: it is then not an input of the graph node, so
  // needs_input_grad counts only the tensors present.
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias, double eps) {
    auto [y, mean, var, invstd] = forward_kernel(x, weight, bias, eps);
    const bool has_w = weight.has_value(), has_b = bias.has_value();
    ctx->save_for_backward({x, has_w ? *weight : Tensor(), mean, invstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = has_w;
    ctx->saved_data["bias_dtype"] = has_b ? int64_t(bias->scalar_type()) : int64_t(-1);
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& dy = grads[0];
    if (!dy.defined()) {
      return {Tensor(), Tensor(), Tensor(), Tensor()};
    }
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &mean = saved[2], &invstd = saved[3];
    Tensor dx, dw, db;
    // create_graph=True, or a dy without memory of its own (a batched gradient of
    // torch.func.vmap, as gradcheck's batched check makes): differentiable ATen operations
    if (at::GradMode::is_enabled() || !dy.has_storage()) {
      std::tie(dx, dw, db) = backward_differentiable(dy, x, w, ctx->saved_data["eps"].toDouble());
    } else {
      std::tie(dx, dw, db) = backward_kernel(dy, x, mean, invstd, w);
    }
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool has_w = ctx->saved_data["has_weight"].toBool(), has_b = bias_dtype >= 0;
    const size_t b_index = has_w ? 2 : 1;  // the node's inputs: x, then those present
    return {
        ctx->needs_input_grad(0) ? dx : Tensor(),  // shaped like x by construction
        has_w && ctx->needs_input_grad(1) ? as_dtype(dw, w.scalar_type()) : Tensor(),
        has_b && ctx->needs_input_grad(b_index) ? as_dtype(db, at::ScalarType(bias_dtype))
                                                : Tensor(),
        Tensor(),
    };
  }
};

std::tuple<Tensor, Tensor, Tensor> train(const Tensor& x, const c10::optional<Tensor>& weight,
                                         const c10::optional<Tensor>& bias, double eps) {
  auto out = NativeBatchNorm::apply(x, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

// train() and the running-statistic update of bnlab.functional.batch_norm.running_update in
// the same call: r ← lerp(r, s, w), s the batch mean and the (optionally n/(n-1)-corrected)
// batch variance. Pure: returns new running tensors, in the running statistics' dtype.
std::tuple<Tensor, Tensor, Tensor> train_update(const Tensor& x,
                                                const c10::optional<Tensor>& weight,
                                                const c10::optional<Tensor>& bias, double eps,
                                                const Tensor& running_mean,
                                                const Tensor& running_var, double w,
                                                bool unbiased) {
  auto out = NativeBatchNorm::apply(x, weight, bias, eps);
  const Tensor &mean = out[1], &var = out[2];  // contiguous, in the accumulation dtype
  const auto acc = mean.scalar_type();
  Tensor rm = as_acc(running_mean, acc);
  Tensor rv = as_acc(running_var, acc);
  Tensor new_mean = at::empty_like(rm), new_var = at::empty_like(rv);
  const int64_t count = x.numel() / x.size(1);
  AT_DISPATCH_FLOATING_TYPES(acc, "bnlab_running_update", [&] {
    // torch.lerp's formula, so that the result is the one of the Python update
    auto lerp = [w](scalar_t a, scalar_t b) {
      const scalar_t ws = scalar_t(w);
      return std::abs(ws) < scalar_t(0.5) ? a + ws * (b - a) : b - (b - a) * (scalar_t(1) - ws);
    };
    const scalar_t correction = unbiased ? scalar_t(double(count) / double(count - 1)) : 1;
    const scalar_t *m = mean.const_data_ptr<scalar_t>(), *v = var.const_data_ptr<scalar_t>();
    const scalar_t *a = rm.const_data_ptr<scalar_t>(), *b = rv.const_data_ptr<scalar_t>();
    scalar_t *om = new_mean.data_ptr<scalar_t>(), *ov = new_var.data_ptr<scalar_t>();
    for (int64_t c = 0; c < rm.numel(); ++c) {
      om[c] = lerp(a[c], m[c]);
      ov[c] = lerp(b[c], v[c] * correction);
    }
  });
  return {out[0], as_dtype(new_mean, running_mean.scalar_type()),
          as_dtype(new_var, running_var.scalar_type())};
}

// y = (x - μ̂)·γ/sqrt(σ̂² + ε) + β with the running statistics, one pass.
Tensor eval(const Tensor& x_in, const Tensor& running_mean, const Tensor& running_var,
            const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, double eps) {
  auto view = canonical(x_in);
  const Tensor x = view.first;
  const Layout L = view.second;
  const auto acc = acc_type(x.scalar_type());
  Tensor rm = as_acc(running_mean, acc);
  Tensor rv = as_acc(running_var, acc);
  Tensor w = per_channel(weight, acc), b = per_channel(bias, acc);
  Tensor y = empty_output(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_eval", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = L.c;
    std::vector<acc_t> s(C), t(C);
    const acc_t* mp = rm.const_data_ptr<acc_t>();
    const acc_t* vp = rv.const_data_ptr<acc_t>();
    const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t inv = acc_t(1) / std::sqrt(vp[c] + acc_t(eps));
      s[c] = wp ? wp[c] * inv : inv;
      t[c] = (bp ? bp[c] : acc_t(0)) - mp[c] * s[c];
    }
    apply_affine<false, scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), L, nullptr, s.data(),
                                         t.data(), y.data_ptr<scalar_t>());
  });
  return y;
}

// ---------------------------------------------------------------- the layer in one call
//
// bnlab.nn.BatchNorm's common case as one call, as PyTorch's module is: the checks of a valid
// input, the kernel, and in training the update of the layer's running-statistic buffers and
// batch count in place. Anything it does not handle (another device, an unusual dtype or
// layout of a buffer, an input the layer would reject) returns nullopt before anything is
// written: the layer then takes its general Python path, which words the error if there is one.

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool dense_cpu_float(const Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.layout() == at::kStrided &&
         is_float(t.scalar_type());
}

bool per_channel_ok(const c10::optional<Tensor>& t, int64_t C) {
  return !t.has_value() || (dense_cpu_float(*t) && t->dim() == 1 && t->size(0) == C);
}

// A running-statistic buffer the update can write in place: (C,), contiguous, in the
// accumulation dtype, outside any graph.
bool buffer_ok(const Tensor& t, int64_t C, at::ScalarType acc) {
  return t.device().is_cpu() && t.layout() == at::kStrided && t.dim() == 1 && t.size(0) == C &&
         t.scalar_type() == acc && t.is_contiguous() && !t.requires_grad();
}

c10::optional<Tensor> layer_forward(const Tensor& x, const c10::optional<Tensor>& weight,
                                    const c10::optional<Tensor>& bias,
                                    const c10::optional<Tensor>& running_mean,
                                    const c10::optional<Tensor>& running_var,
                                    const c10::optional<Tensor>& num_batches_tracked, double eps,
                                    double momentum, bool momentum_is_decay, bool unbiased,
                                    bool batch_stats, int64_t expected_dim, int64_t expected_c) {
  if (!dense_cpu_float(x) || x.dim() < 2 || (expected_dim >= 0 && x.dim() != expected_dim)) {
    return c10::nullopt;
  }
  const int64_t C = x.size(1);
  if (C == 0 || (expected_c >= 0 && C != expected_c) || x.numel() == 0 ||
      !per_channel_ok(weight, C) || !per_channel_ok(bias, C)) {
    return c10::nullopt;
  }
  const bool tracking = running_mean.has_value();
  if (tracking != running_var.has_value()) {
    return c10::nullopt;
  }
  const auto acc = acc_type(x.scalar_type());
  if (tracking && !(buffer_ok(*running_mean, C, acc) && buffer_ok(*running_var, C, acc))) {
    return c10::nullopt;
  }
  if (!tracking || !batch_stats) {
    if (!tracking) {  // no running statistics: batch statistics in every mode, nothing to store
      if (x.numel() / C <= 1) {
        return c10::nullopt;
      }
      return NativeBatchNorm::apply(x, weight, bias, eps)[0];
    }
    const bool grad = at::GradMode::is_enabled() &&
                      (x.requires_grad() || (weight.has_value() && weight->requires_grad()) ||
                       (bias.has_value() && bias->requires_grad()));
    if (grad) {  // prediction with a gradient: the differentiable Python path
      return c10::nullopt;
    }
    return eval(x, *running_mean, *running_var, weight, bias, eps);
  }
  const int64_t count = x.numel() / C;
  if (count <= 1 || !num_batches_tracked.has_value()) {
    return c10::nullopt;
  }
  const Tensor& nbt = *num_batches_tracked;
  if (!nbt.device().is_cpu() || nbt.scalar_type() != at::kLong || nbt.numel() != 1 ||
      nbt.requires_grad()) {
    return c10::nullopt;
  }
  // all checks passed: from here on the call runs to the end
  auto out = NativeBatchNorm::apply(x, weight, bias, eps);
  const Tensor &mean = out[1], &var = out[2];  // contiguous, in the accumulation dtype
  int64_t* seen = nbt.data_ptr<int64_t>();
  // the weight on the new batch (bnlab.functional.batch_norm's Convention.new_batch_weight)
  const double w = momentum < 0 ? 1.0 / double(*seen + 1)
                                : (momentum_is_decay ? 1.0 - momentum : momentum);
  AT_DISPATCH_FLOATING_TYPES(acc, "bnlab_layer_update", [&] {
    // torch.lerp's formula, as in train_update
    const scalar_t ws = scalar_t(w);
    auto lerp = [ws](scalar_t a, scalar_t b) {
      return std::abs(ws) < scalar_t(0.5) ? a + ws * (b - a) : b - (b - a) * (scalar_t(1) - ws);
    };
    const scalar_t correction = unbiased ? scalar_t(double(count) / double(count - 1)) : 1;
    const scalar_t *m = mean.const_data_ptr<scalar_t>(), *v = var.const_data_ptr<scalar_t>();
    scalar_t* rm = running_mean->data_ptr<scalar_t>();
    scalar_t* rv = running_var->data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      rm[c] = lerp(rm[c], m[c]);
      rv[c] = lerp(rv[c], v[c] * correction);
    }
  });
  *seen += 1;
  // in-place writes, as an ATen in-place operation records them: a graph that saved a buffer
  // then fails loudly in its backward instead of using the new values
  torch::autograd::impl::bump_version(*running_mean);
  torch::autograd::impl::bump_version(*running_var);
  torch::autograd::impl::bump_version(nbt);
  return out[0];
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train", &train, "training batch norm: (y, batch mean, biased batch var)");
  m.def("train_update", &train_update, "train() and the running-statistic update");
  m.def("eval", &eval, "batch norm with running statistics");
  m.def("layer_forward", &layer_forward,
        "bnlab.nn.BatchNorm's forward, running statistics updated in place; None: not handled");
  m.def("cache_info", [] { return output_cache().info(); },
        "the output cache: cached_bytes, limit_bytes, hits, misses");
  m.def("set_cache_limit", [](int64_t bytes) { output_cache().set_limit(size_t(bytes)); },
        "the most freed output memory the cache keeps, in bytes (0: none)");
  m.def("empty_cache", [] { output_cache().empty(); }, "frees every cached output block");
}
