// Probe (not a feature; bench/budget_alloc/build.sh builds it): a CPU allocator that keeps freed
// blocks >= 1 MiB (rounded up to a multiple of 1/16 of the next power of two: 8 size classes per
// doubling) for reuse, least recently freed evicted first, up to a byte budget; smaller blocks go
// to the default allocator.
// Known limits, left as they are so that this is the code that was measured (comments aside):
// g_alloc is a global with destructors, so a tensor freed after this library's static teardown
// at process exit would touch destroyed containers (never seen: the runs exited with status 0);
// pointers it did not hand out are freed with c10::free_cpu, right only while the base allocator
// is PyTorch's default (base->raw_deallocate would be general); stats are read without the lock.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <atomic>
#include <map>
#include <mutex>
#include <unordered_map>
#include <list>
#include <vector>
#include <cstdio>

namespace {
constexpr size_t kMin = size_t(1) << 20;

size_t round_size(size_t n) {
  size_t p = 1;
  while (p < n) p <<= 1;            // next power of two >= n
  size_t step = p >> 4;             // a multiple of 1/16 of the next power of two
  return (n + step - 1) / step * step;
}

struct BudgetAllocator final : c10::Allocator {
  c10::Allocator* base = nullptr;
  std::mutex mu;
  std::list<std::pair<size_t, void*>> lru;               // oldest first
  std::multimap<size_t, std::list<std::pair<size_t, void*>>::iterator> cache;
  std::unordered_map<void*, size_t> live;      // block -> rounded size
  size_t cached = 0, budget = 0;
  std::atomic<size_t> hits{0}, misses{0}, dropped{0}, peak_cached{0};

  static void deleter(void* p);

  c10::DataPtr allocate(size_t n) override {
    if (n < kMin) return base->allocate(n);
    size_t r = round_size(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = cache.find(r);
      if (it != cache.end()) { p = it->second->second; lru.erase(it->second); cache.erase(it); cached -= r; }
    }
    if (p) hits++; else { misses++; p = c10::alloc_cpu(r); }
    {
      std::lock_guard<std::mutex> g(mu);
      live[p] = r;
    }
    return {p, p, &deleter, c10::Device(c10::DeviceType::CPU)};
  }

  void release(void* p) {
    std::unique_lock<std::mutex> g(mu);
    auto it = live.find(p);
    if (it == live.end()) {             // a small block of the base allocator (raw_deallocate)
      g.unlock();
      c10::free_cpu(p);
      return;
    }
    size_t r = it->second;
    live.erase(it);
    if (r > budget) { g.unlock(); dropped++; c10::free_cpu(p); return; }
    std::vector<void*> evict;
    while (cached + r > budget && !lru.empty()) {
      auto [sz, q] = lru.front();
      auto range = cache.equal_range(sz);
      for (auto c = range.first; c != range.second; ++c)
        if (c->second == lru.begin()) { cache.erase(c); break; }
      lru.pop_front();
      cached -= sz;
      evict.push_back(q);
    }
    lru.emplace_back(r, p);
    cache.emplace(r, std::prev(lru.end()));
    cached += r;
    if (cached > peak_cached) peak_cached = cached;
    dropped += evict.size();
    g.unlock();
    for (void* q : evict) c10::free_cpu(q);
  }

  c10::DeleterFnPtr raw_deleter() const override { return &deleter; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

BudgetAllocator g_alloc;
void BudgetAllocator::deleter(void* p) { g_alloc.release(p); }
}  // namespace

extern "C" void budget_install(size_t budget) {
  g_alloc.base = c10::GetCPUAllocator();
  g_alloc.budget = budget;
  c10::SetCPUAllocator(&g_alloc, /*priority=*/10);
}

extern "C" void budget_stats(size_t* out) {
  out[0] = g_alloc.hits; out[1] = g_alloc.misses; out[2] = g_alloc.dropped;
  out[3] = g_alloc.cached; out[4] = g_alloc.peak_cached;
}
