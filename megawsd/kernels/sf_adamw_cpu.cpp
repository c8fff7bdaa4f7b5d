// Schedule-free AdamW step on CPU: one pass over y, g, z, v (and m, the lowp copy) per tensor,
// vectorised with at::vec and split over threads with at::parallel_for, as ATen's
// FusedAdamKernel.cpp does for torch.optim.AdamW(fused=True), but with one parallel region for
// the whole tensor list (work units of kUnit elements numbered across the tensors), handed
// out to the threads in chunks on demand.
//
// The math is sf_adamw_compiled._sf_adamw_math, operation for operation (same fp32 roundings,
// no contraction into FMAs: built with -ffp-contract=off like Inductor), so this path and the
// torch.compile path give the same values. The step's scalars come in the fp32 tensor built
// by sf_adamw_compiled.pack_scalars; the indices below must match its _LR.._IBC1.
//
// Registered as torch.ops.megawsd_sf_cpu.step (no pybind: a lighter build).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>  // convert_to_float / convert_from_float
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
enum Scalar { LR, W, ZBASE, B2, OMB2, IBC2, EPS, WD, YCOEF, GS, MU, OMMU, IBC1, NSCALARS };

// Elements per parallel work unit: a whole number of vectors, so chunks never split one.
constexpr int64_t kUnit = 1024;
// Units per thread: a list of at most kGrainUnits units (1M elements) runs on one thread,
// a larger one on up to units / kGrainUnits threads. A parallel region pays only when each
// thread has about a millisecond of work; on a shared machine it waits for a preempted
// thread. Measured on a 2-core machine at load 10-21 (interleaved rounds,
// bench/bench_timing.py, 7 rounds x 15 calls; fp32, one tensor): one thread 0.25 ms at 256K
// against 19 ms for two, 1.07 ms against 29 ms at 1M (20-41x), 1.47 against 30 ms at 1.5M,
// 17 against 31 ms at 4M (1.1-3.4x); at 16K-64K they tie. With 32 units (32K elements) the
// 1M step ran 5x slower than the torch.compile path under load (issue #21); now it is 1.2x
// faster. An idle machine favours two threads earlier; this keeps small steps safe.
constexpr int64_t kGrainUnits = 1024;
// Units per chunk a thread takes at a time (16K elements: 64 KiB of each fp32 stream).
constexpr int64_t kChunkUnits = 16;

// Two float vectors of 2 * Vec::size() consecutive elements: for bf16/fp16 one full-width
// load and one widening, as ATen's FusedAdamKernel.cpp does.
template <typename T>
inline void load2(const T* p, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store2(T* p, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + Vec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);  // round to nearest even, as Tensor.copy_
  }
}

// The last < 2 * Vec::size() elements, one vector (or part of one) at a time.
template <typename T>
inline Vec load_n(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
    return at::vec::convert<float>(at::vec::Vectorized<T>::loadu(p, n));
  }
}

template <typename T>
inline void store_n(T* p, const Vec& x, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    x.store(p, n);
  } else {
    at::vec::convert<T>(x).store(p, n);
  }
}

struct Coef {
  Vec lr, w, b2, omb2, ibc2, eps, wd, ycoef, gs, mu, ommu, ibc1;
  bool zbase;
  explicit Coef(const float* s)
      : lr(s[LR]), w(s[W]), b2(s[B2]), omb2(s[OMB2]), ibc2(s[IBC2]), eps(s[EPS]), wd(s[WD]),
        ycoef(s[YCOEF]), gs(s[GS]), mu(s[MU]), ommu(s[OMMU]), ibc1(s[IBC1]), zbase(s[ZBASE] > 0) {}
};

// The update of one vector of elements, in registers: g, y in; v, z, m updated; y_new out.
template <bool M>
inline Vec update(const Coef& c, Vec g, Vec y32, Vec& v, Vec& z, Vec& m) {
  const Vec g32 = g * c.gs;
  v = v * c.b2 + c.omb2 * (g32 * g32);
  const Vec denom = (v * c.ibc2).sqrt() + c.eps;
  Vec u;
  if constexpr (M) {
    m = m * c.mu + c.ommu * g32;
    u = (m * c.ibc1) / denom + c.wd * y32;
  } else {
    u = g32 / denom + c.wd * y32;
  }
  // torch.lerp(y, z, w): both sides written as base + w (z - y), see sf_adamw_compiled.
  const Vec y_new = ((c.zbase ? z : y32) + c.w * (z - y32)) + c.ycoef * u;
  z = z - c.lr * u;
  return y_new;
}

// Elements [begin, end) of one tensor. O = void: no low-precision copy; M: inner momentum.
template <typename Y, typename G, typename O, bool M>
void step_range(Y* y, const G* g, float* z, float* v, float* m, O* out, const Coef& coef,
                int64_t begin, int64_t end) {
  const Coef c = coef;  // a local copy: the stores below cannot alias it, it stays in registers
  constexpr int64_t kStep = 2 * Vec::size();
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) {
    Vec g0, g1, y0, y1, m0, m1;
    load2(g + i, g0, g1);
    load2(y + i, y0, y1);
    Vec v0 = Vec::loadu(v + i), v1 = Vec::loadu(v + i + Vec::size());
    Vec z0 = Vec::loadu(z + i), z1 = Vec::loadu(z + i + Vec::size());
    if constexpr (M) {
      m0 = Vec::loadu(m + i);
      m1 = Vec::loadu(m + i + Vec::size());
    }
    const Vec n0 = update<M>(c, g0, y0, v0, z0, m0);
    const Vec n1 = update<M>(c, g1, y1, v1, z1, m1);
    store2(v + i, v0, v1);
    store2(z + i, z0, z1);
    if constexpr (M) {
      store2(m + i, m0, m1);
    }
    store2(y + i, n0, n1);
    if constexpr (!std::is_void_v<O>) {
      store2(out + i, n0, n1);
    }
  }
  for (; i < end; i += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), end - i);
    Vec vi = Vec::loadu(v + i, n), zi = Vec::loadu(z + i, n), mi;
    if constexpr (M) {
      mi = Vec::loadu(m + i, n);
    }
    const Vec y_new = update<M>(c, load_n(g + i, n), load_n(y + i, n), vi, zi, mi);
    vi.store(v + i, n);
    zi.store(z + i, n);
    if constexpr (M) {
      mi.store(m + i, n);
    }
    store_n(y + i, y_new, n);
    if constexpr (!std::is_void_v<O>) {
      store_n(out + i, y_new, n);
    }
  }
}

// One tensor of the list: its pointers, its first work unit in the whole list's unit range,
// and the step_range instantiation for its dtypes.
struct Job {
  void* y;
  const void* g;
  float* z;
  float* v;
  float* m;
  void* out;
  int64_t numel, first_unit;
  void (*run)(const Job&, const Coef&, int64_t, int64_t);
};

template <typename Y, typename G, typename O, bool M>
void run_range(const Job& j, const Coef& c, int64_t begin, int64_t end) {
  step_range<Y, G, O, M>(static_cast<Y*>(j.y), static_cast<const G*>(j.g), j.z, j.v, j.m,
                         static_cast<O*>(j.out), c, begin, end);
}

using RunFn = void (*)(const Job&, const Coef&, int64_t, int64_t);

template <typename Y, typename G, bool M>
RunFn pick_out(c10::optional<at::ScalarType> out) {
  if (!out) return &run_range<Y, G, void, M>;
  switch (*out) {
    case at::kFloat: return &run_range<Y, G, float, M>;
    case at::kBFloat16: return &run_range<Y, G, c10::BFloat16, M>;
    case at::kHalf: return &run_range<Y, G, c10::Half, M>;
    default: return nullptr;
  }
}

template <typename Y, bool M>
RunFn pick_grad(at::ScalarType g, at::ScalarType y, c10::optional<at::ScalarType> out) {
  if (g == y) return pick_out<Y, Y, M>(out);
  if constexpr (!std::is_same_v<Y, float>) {
    if (g == at::kFloat) return pick_out<Y, float, M>(out);
  }
  return nullptr;
}

template <bool M>
RunFn pick(at::ScalarType y, at::ScalarType g, c10::optional<at::ScalarType> out) {
  switch (y) {
    case at::kFloat: return pick_grad<float, M>(g, y, out);
    case at::kBFloat16: return pick_grad<c10::BFloat16, M>(g, y, out);
    case at::kHalf: return pick_grad<c10::Half, M>(g, y, out);
    default: return nullptr;
  }
}

// Checks one tensor's buffers and builds its Job (first_unit is set by the caller).
Job make_job(size_t i, const at::Tensor& y, const at::Tensor& g, const at::Tensor& z,
             const at::Tensor& v, const at::Tensor* out, const at::Tensor* m) {
  const int64_t numel = y.numel();
  bool ok = y.is_cpu() && y.is_contiguous() && g.is_contiguous() && z.is_contiguous() &&
            v.is_contiguous() && g.numel() == numel && z.numel() == numel &&
            v.numel() == numel && z.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat;
  if (out) ok = ok && out->is_contiguous() && out->numel() == numel;
  if (m) ok = ok && m->is_contiguous() && m->numel() == numel && m->scalar_type() == at::kFloat;
  TORCH_CHECK(ok, "megawsd_sf_cpu.step: tensor ", i,
              " is not contiguous CPU memory of equal numel with fp32 z, v (and m)");
  c10::optional<at::ScalarType> od;
  if (out) od = out->scalar_type();
  RunFn run = m ? pick<true>(y.scalar_type(), g.scalar_type(), od)
                : pick<false>(y.scalar_type(), g.scalar_type(), od);
  TORCH_CHECK(run != nullptr, "megawsd_sf_cpu.step: unsupported dtypes at tensor ", i);
  return Job{y.data_ptr(), g.const_data_ptr(), z.data_ptr<float>(), v.data_ptr<float>(),
             m ? m->data_ptr<float>() : nullptr, out ? out->data_ptr() : nullptr, numel, 0, run};
}

// Work units [ub, ue) of the list: the part of each tensor they overlap.
void run_units(const std::vector<Job>& jobs, const Coef& c, int64_t ub, int64_t ue) {
  auto it = std::upper_bound(jobs.begin(), jobs.end(), ub,
                             [](int64_t u, const Job& j) { return u < j.first_unit; });
  for (--it; it != jobs.end() && it->first_unit < ue; ++it) {
    const int64_t begin = std::max<int64_t>(ub - it->first_unit, 0) * kUnit;
    const int64_t end = std::min((ue - it->first_unit) * kUnit, it->numel);
    if (begin < end) it->run(*it, c, begin, end);
  }
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
  std::vector<Job> jobs;
  jobs.reserve(n);
  int64_t units = 0;
  for (size_t i = 0; i < n; ++i) {
    jobs.push_back(make_job(i, ys[i], grads[i], zs[i], vs[i], outs.empty() ? nullptr : &outs[i],
                            ms.empty() ? nullptr : &ms[i]));
    jobs.back().first_unit = units;
    units += (jobs.back().numel + kUnit - 1) / kUnit;
  }
  // One parallel region for the whole list (not one per tensor), and chunks handed out on
  // demand rather than one fixed share per thread: a thread that the OS preempts (a shared
  // or oversubscribed machine) no longer holds the whole step back, the others take its
  // chunks. On an idle machine this costs one atomic increment per chunk.
  const int64_t chunks = (units + kChunkUnits - 1) / kChunkUnits;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(),
                                            (units + kGrainUnits - 1) / kGrainUnits);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t k = next++; k < chunks; k = next++) {
      run_units(jobs, c, k * kChunkUnits, std::min((k + 1) * kChunkUnits, units));
    }
  });
}

}  // namespace

TORCH_LIBRARY(megawsd_sf_cpu, lib) {
  lib.def(
      "step(Tensor(a!)[] ys, Tensor[] grads, Tensor(b!)[] zs, Tensor(c!)[] vs, "
      "Tensor(d!)[] outs, Tensor(e!)[] ms, Tensor scalars) -> ()");
}

TORCH_LIBRARY_IMPL(megawsd_sf_cpu, CPU, lib) { lib.impl("step", &step); }
