// bnlab's native CPU batch norm: the math of bnlab/functional/fast.py as fused C++ loops.
//
// Every input is read as one of two memory orders (no copy for contiguous or channels-last):
//   rows  (M, C): channels innermost, (N, C) and channels-last of any rank
//   ncl   (N, C, L): contiguous NC*, one run of L values per (n, c)
// Statistics: corrected two-pass (m0 = mean, then Σd and Σd² of d = x - m0), in float32 for
// half inputs and in the input's dtype otherwise. Partial sums are taken over fixed blocks, so
// the result does not depend on the number of threads.
//
// The autograd function saves x, γ, μ and invstd; its backward is two passes:
//   Σdy, Σdy·(x - μ), then ∂x = s·dy + k·(x - μ) + c per element.
// With create_graph=True the backward is recomputed from x with ATen operations, so higher
// derivatives are exact.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kRowBlock = 128;       // rows per partial sum (rows layout)
constexpr int64_t kGrainElems = 1 << 15;  // smallest piece of work worth a thread

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

// ---------------------------------------------------------------- per-channel sums
//
// sums(x, L, f): for every channel, Σ f(value, channel) over its n·l values, as `acc_t`.
// `f` returns up to two terms (a, b) summed into out_a and out_b.

// `y` (a second tensor in x's layout, or nullptr) is a template flag, so that no branch is
// left in the inner loops and they vectorize.
template <bool with_y, typename scalar_t, typename acc_t, typename F>
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
          const scalar_t* yr = with_y ? y + r * C : nullptr;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t yv = with_y ? acc_t(yr[c]) : acc_t(0);
            auto [ta, tb] = f(acc_t(xr[c]), yv, c);
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
  const int64_t N = L.n, Lw = L.l;
  at::parallel_for(0, C, grain(N * Lw), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t sa = 0, sb = 0;
      for (int64_t i = 0; i < N; ++i) {
        const scalar_t* xr = x + (i * C + c) * Lw;
        const scalar_t* yr = with_y ? y + (i * C + c) * Lw : nullptr;
        acc_t ra = 0, rb = 0;
        for (int64_t j = 0; j < Lw; ++j) {
          const acc_t yv = with_y ? acc_t(yr[j]) : acc_t(0);
          auto [ta, tb] = f(acc_t(xr[j]), yv, c);
          ra += ta;
          rb += tb;
        }
        sa += ra;
        sb += rb;
      }
      out_a[c] = sa;
      out_b[c] = sb;
    }
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
  if (L.rows) {
    at::parallel_for(0, L.n, grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = x + r * C;
        scalar_t* o = out + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = centered ? acc_t(xr[c]) - m[c] : acc_t(xr[c]);
          o[c] = scalar_t(v * s[c] + t[c]);
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
        const acc_t v = centered ? acc_t(xr[j]) - mc : acc_t(xr[j]);
        o[j] = scalar_t(v * sc + sh);
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
  Tensor y = at::empty_like(x);
  Tensor w = per_channel(weight, acc), b = per_channel(bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t C = L.c;
    const acc_t n = acc_t(L.n * L.l);
    std::vector<acc_t> m0(C), unused(C), s1(C), s2(C), scale(C), shift(C);
    channel_sums<false, scalar_t, acc_t>(
        xp, nullptr, L, [](acc_t v, acc_t, int64_t) { return std::pair<acc_t, acc_t>(v, 0); },
        m0.data(), unused.data());
    for (auto& m : m0) m /= n;
    const acc_t* m0p = m0.data();
    channel_sums<false, scalar_t, acc_t>(
        xp, nullptr, L,
        [m0p](acc_t v, acc_t, int64_t c) {
          const acc_t d = v - m0p[c];
          return std::pair<acc_t, acc_t>(d, d * d);
        },
        s1.data(), s2.data());
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t delta = s1[c] / n;  // the rounding error of m0
      const acc_t v = std::max(s2[c] / n - delta * delta, acc_t(0));
      mp[c] = m0[c] + delta;
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
  Tensor dx = at::empty_like(x);
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
    // x is the first argument, dy the second
    channel_sums<true, scalar_t, acc_t>(
        x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), L,
        [mp](acc_t v, acc_t g, int64_t c) { return std::pair<acc_t, acc_t>(g, g * (v - mp[c])); },
        dbp, sum_dy_xc.data());
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
    if (L.rows) {
      const int64_t Cn = C;
      at::parallel_for(0, L.n, grain(C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t c = 0; c < Cn; ++c) {
            const int64_t i = r * Cn + c;
            op[i] = scalar_t(s[c] * acc_t(gp[i]) + k[c] * (acc_t(xp[i]) - mp[c]) + t[c]);
          }
        }
      });
    } else {
      const int64_t Lw = L.l;
      at::parallel_for(0, L.n * C, grain(Lw), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t c = p % C;
          const acc_t sc = s[c], kc = k[c], tc = t[c], mc = mp[c];
          for (int64_t j = p * Lw; j < (p + 1) * Lw; ++j) {
            op[j] = scalar_t(sc * acc_t(gp[j]) + kc * (acc_t(xp[j]) - mc) + tc);
          }
        }
      });
    }
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
    if (at::GradMode::is_enabled()) {
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
  Tensor y = at::empty_like(x);
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train", &train, "training batch norm: (y, batch mean, biased batch var)");
  m.def("train_update", &train_update, "train() and the running-statistic update");
  m.def("eval", &eval, "batch norm with running statistics");
}
