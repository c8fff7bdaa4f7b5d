// Schedule-free AdamW step on CPU: one pass over y, g, z, v (and m, the lowp copy) per tensor,
// vectorised with at::vec and split over threads with at::parallel_for, as ATen's
// FusedAdamKernel.cpp does for torch.optim.AdamW(fused=True).
//
// The math is sf_adamw_compiled._sf_adamw_math, operation for operation (same fp32 roundings,
// no contraction into FMAs: built with -ffp-contract=off like Inductor), so this path and the
// torch.compile path give the same values. The step's scalars come in the fp32 tensor built
// by sf_adamw_compiled.pack_scalars; the indices below must match its _LR.._BC1.
//
// Registered as torch.ops.megawsd_sf_cpu.step (no pybind: a lighter build).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
enum Scalar { LR, W, ZBASE, B2, OMB2, BC2, EPS, WD, YCOEF, GS, MU, OMMU, BC1, NSCALARS };

// Elements per parallel work unit: a whole number of vectors, so chunks never split one.
constexpr int64_t kUnit = 1024;
// Below this many units a tensor runs on one thread (thread wake-up costs more than it saves).
constexpr int64_t kGrainUnits = 32;

template <typename T>
inline Vec load(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
    return at::vec::convert<float>(at::vec::Vectorized<T>::loadu(p, n));
  }
}

template <typename T>
inline void store(T* p, const Vec& x, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    x.store(p, n);
  } else {
    at::vec::convert<T>(x).store(p, n);  // round to nearest even, as Tensor.copy_
  }
}

struct Coef {
  Vec lr, w, b2, omb2, bc2, eps, wd, ycoef, gs, mu, ommu, bc1;
  bool zbase;
  explicit Coef(const float* s)
      : lr(s[LR]), w(s[W]), b2(s[B2]), omb2(s[OMB2]), bc2(s[BC2]), eps(s[EPS]), wd(s[WD]),
        ycoef(s[YCOEF]), gs(s[GS]), mu(s[MU]), ommu(s[OMMU]), bc1(s[BC1]), zbase(s[ZBASE] > 0) {}
};

// Elements [begin, end) of one tensor. O = void: no low-precision copy; M: inner momentum.
template <typename Y, typename G, typename O, bool M>
void step_range(Y* y, const G* g, float* z, float* v, float* m, O* out, const Coef& c,
                int64_t begin, int64_t end) {
  constexpr int64_t kVec = Vec::size();
  for (int64_t i = begin; i < end; i += kVec) {
    const int64_t n = std::min(kVec, end - i);
    const Vec g32 = load(g + i, n) * c.gs;
    const Vec v_new = load(v + i, n) * c.b2 + c.omb2 * (g32 * g32);
    const Vec denom = (v_new / c.bc2).sqrt() + c.eps;
    const Vec y32 = load(y + i, n);
    const Vec zi = Vec::loadu(z + i, n);
    Vec u;
    if constexpr (M) {
      const Vec m_new = Vec::loadu(m + i, n) * c.mu + c.ommu * g32;
      u = (m_new / c.bc1) / denom + c.wd * y32;
      m_new.store(m + i, n);
    } else {
      u = g32 / denom + c.wd * y32;
    }
    // torch.lerp(y, z, w): both sides written as base + w (z - y), see sf_adamw_compiled.
    const Vec y_new = ((c.zbase ? zi : y32) + c.w * (zi - y32)) + c.ycoef * u;
    const Vec z_new = zi - c.lr * u;
    v_new.store(v + i, n);
    z_new.store(z + i, n);
    store(y + i, y_new, n);
    if constexpr (!std::is_void_v<O>) {
      store(out + i, y_new, n);
    }
  }
}

template <typename Y, typename G, typename O, bool M>
void step_tensor(const at::Tensor& y, const at::Tensor& g, const at::Tensor& z,
                 const at::Tensor& v, const at::Tensor* m, const at::Tensor* out,
                 const Coef& c) {
  const int64_t numel = y.numel();
  Y* yp = static_cast<Y*>(y.data_ptr());
  const G* gp = static_cast<const G*>(g.const_data_ptr());
  float* zp = z.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  float* mp = M ? m->data_ptr<float>() : nullptr;
  O* op = nullptr;
  if constexpr (!std::is_void_v<O>) {
    op = static_cast<O*>(out->data_ptr());
  }
  const int64_t units = (numel + kUnit - 1) / kUnit;
  at::parallel_for(0, units, kGrainUnits, [&](int64_t ub, int64_t ue) {
    step_range<Y, G, O, M>(yp, gp, zp, vp, mp, op, c, ub * kUnit, std::min(ue * kUnit, numel));
  });
}

using StepFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor*, const at::Tensor*, const Coef&);

template <typename Y, typename G, bool M>
StepFn pick_out(c10::optional<at::ScalarType> out) {
  if (!out) return &step_tensor<Y, G, void, M>;
  switch (*out) {
    case at::kFloat: return &step_tensor<Y, G, float, M>;
    case at::kBFloat16: return &step_tensor<Y, G, c10::BFloat16, M>;
    case at::kHalf: return &step_tensor<Y, G, c10::Half, M>;
    default: return nullptr;
  }
}

template <typename Y, bool M>
StepFn pick_grad(at::ScalarType g, at::ScalarType y, c10::optional<at::ScalarType> out) {
  if (g == y) return pick_out<Y, Y, M>(out);
  if constexpr (!std::is_same_v<Y, float>) {
    if (g == at::kFloat) return pick_out<Y, float, M>(out);
  }
  return nullptr;
}

template <bool M>
StepFn pick(at::ScalarType y, at::ScalarType g, c10::optional<at::ScalarType> out) {
  switch (y) {
    case at::kFloat: return pick_grad<float, M>(g, y, out);
    case at::kBFloat16: return pick_grad<c10::BFloat16, M>(g, y, out);
    case at::kHalf: return pick_grad<c10::Half, M>(g, y, out);
    default: return nullptr;
  }
}

StepFn pick_fn(const at::Tensor& y, const at::Tensor& g, const at::Tensor* out, bool m) {
  c10::optional<at::ScalarType> od;
  if (out) od = out->scalar_type();
  return m ? pick<true>(y.scalar_type(), g.scalar_type(), od)
           : pick<false>(y.scalar_type(), g.scalar_type(), od);
}

void step(at::TensorList ys, at::TensorList grads, at::TensorList zs, at::TensorList vs,
          at::TensorList outs, at::TensorList ms, const at::Tensor& scalars) {
  TORCH_CHECK(scalars.scalar_type() == at::kFloat && scalars.numel() == NSCALARS &&
                  scalars.is_contiguous(),
              "megawsd_sf_cpu.step: scalars must be ", NSCALARS, " contiguous fp32 values");
  const size_t n = ys.size();
  TORCH_CHECK(grads.size() == n && zs.size() == n && vs.size() == n,
              "megawsd_sf_cpu.step: ys, grads, zs, vs must have equal lengths");
  TORCH_CHECK(outs.empty() || outs.size() == n, "megawsd_sf_cpu.step: outs length");
  TORCH_CHECK(ms.empty() || ms.size() == n, "megawsd_sf_cpu.step: ms length");
  const Coef c(scalars.const_data_ptr<float>());
  // Check every tensor before touching any: a refusal leaves all of them as they were.
  std::vector<StepFn> fns(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor* out = outs.empty() ? nullptr : &outs[i];
    const at::Tensor* m = ms.empty() ? nullptr : &ms[i];
    const int64_t numel = ys[i].numel();
    bool ok = ys[i].is_cpu() && ys[i].is_contiguous() && grads[i].is_contiguous() &&
              zs[i].is_contiguous() && vs[i].is_contiguous() && grads[i].numel() == numel &&
              zs[i].numel() == numel && vs[i].numel() == numel &&
              zs[i].scalar_type() == at::kFloat && vs[i].scalar_type() == at::kFloat;
    if (out) ok = ok && out->is_contiguous() && out->numel() == numel;
    if (m) ok = ok && m->is_contiguous() && m->numel() == numel && m->scalar_type() == at::kFloat;
    TORCH_CHECK(ok, "megawsd_sf_cpu.step: tensor ", i,
                " is not contiguous CPU memory of equal numel with fp32 z, v (and m)");
    fns[i] = pick_fn(ys[i], grads[i], out, m != nullptr);
    TORCH_CHECK(fns[i] != nullptr, "megawsd_sf_cpu.step: unsupported dtypes at tensor ", i);
  }
  for (size_t i = 0; i < n; ++i) {
    fns[i](ys[i], grads[i], zs[i], vs[i], ms.empty() ? nullptr : &ms[i],
           outs.empty() ? nullptr : &outs[i], c);
  }
}

}  // namespace

TORCH_LIBRARY(megawsd_sf_cpu, lib) {
  lib.def(
      "step(Tensor(a!)[] ys, Tensor[] grads, Tensor(b!)[] zs, Tensor(c!)[] vs, "
      "Tensor(d!)[] outs, Tensor(e!)[] ms, Tensor scalars) -> ()");
}

TORCH_LIBRARY_IMPL(megawsd_sf_cpu, CPU, lib) { lib.impl("step", &step); }
