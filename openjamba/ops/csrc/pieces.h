// Work sharing for the decode kernels: for_pieces(count, threads, piece) runs piece(i) for every i in [0, count)
// on the calling thread and up to threads - 1 workers of one process-wide pool.
//
// Why not an OpenMP parallel loop: every region ends in a barrier that waits for each thread of the team, so when
// one of them is descheduled (anything else running on a small machine: the server's own threads, a browser, the
// benchmark's client) the step waits for it, a whole share of the work late. Here the pieces are claimed from one
// atomic counter by whoever is running: the caller claims pieces until none is left and then waits only for pieces
// a worker has claimed and not finished. A worker that wakes late finds nothing left and does nothing, so a
// descheduled thread costs at most the piece it holds.
//
// Results do not depend on which thread runs a piece: the kernels compute each output element in exactly one piece,
// in an order fixed by the piece alone. Waiting: idle workers spin on the job counter for a short while (a decode
// step calls the kernels back to back, between a few microseconds of Python), then sleep on a futex, so they do not
// take a core from Python or from other processes between steps. A call made inside a piece, or while another
// thread's call holds the pool (two Python threads), runs its pieces itself, serially: no deadlock, same results.
// The pool is created on first use, grows to the largest thread count asked for, is replaced by a fresh one in a
// forked child (its workers do not exist there), and is never destroyed: the workers sleep until the process exits.

#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <type_traits>

#if defined(__linux__)
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#define OPENJAMBA_FUTEX 1
#else
#include <pthread.h>
#include <sched.h>
#endif

namespace openjamba {
namespace pieces_detail {

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// How long an idle worker spins before sleeping, in microseconds ($OPENJAMBA_SPIN_US, default 100).
inline int64_t spin_us() {
  static const int64_t us = [] {
    const char* s = std::getenv("OPENJAMBA_SPIN_US");
    return s ? std::max<int64_t>(0, std::atoll(s)) : int64_t(100);
  }();
  return us;
}

inline int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Sleep while *word == value (or return at once if it differs); wake every sleeper on word.
inline void wait_while_equal(std::atomic<uint32_t>* word, uint32_t value) {
#ifdef OPENJAMBA_FUTEX
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, value, nullptr, nullptr, 0);
#else
  while (word->load() == value) std::this_thread::sleep_for(std::chrono::microseconds(50));
#endif
}

inline void wake_all(std::atomic<uint32_t>* word) {
#ifdef OPENJAMBA_FUTEX
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

using PieceFn = void (*)(void* context, int64_t piece);

// One job at a time. `claim` packs the job's epoch (high 32 bits) with the next unclaimed piece (low 32 bits): a
// worker claims by compare-and-swap, which fails if the job it read about is over, so a late worker never runs a
// piece of a finished job nor one of the next job with the previous job's arguments.
struct Pool {
  std::atomic<uint64_t> claim{0};
  std::atomic<int64_t> done{0};       // pieces finished by workers in the current job
  std::atomic<uint32_t> epoch{0};     // the current job's epoch: what sleeping workers wait on
  std::atomic<int32_t> sleepers{0};
  std::atomic<int64_t> count{0}, helpers{0};  // the current job: its pieces, the workers that may take part
  std::atomic<PieceFn> fn{nullptr};
  std::atomic<void*> context{nullptr};
  std::mutex busy;  // held by the thread whose job runs
  int workers = 0;  // started (under busy)

  void work(int id, uint32_t job) {
    for (;;) {
      uint64_t c = claim.load(std::memory_order_acquire);
      const int64_t n = count.load(std::memory_order_relaxed);
      const PieceFn f = fn.load(std::memory_order_relaxed);
      void* ctx = context.load(std::memory_order_relaxed);
      if (static_cast<uint32_t>(c >> 32) != job || id >= helpers.load(std::memory_order_relaxed)) return;
      const int64_t i = static_cast<int64_t>(c & 0xffffffffu);
      if (i >= n) return;
      if (!claim.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_relaxed)) continue;
      f(ctx, i);
      done.fetch_add(1, std::memory_order_release);
    }
  }

  [[noreturn]] void serve(int id) {
    uint32_t seen = epoch.load(std::memory_order_acquire);
    for (;;) {
      const int64_t deadline = now_us() + spin_us();
      uint32_t e;
      for (int spins = 0; (e = epoch.load(std::memory_order_acquire)) == seen; ++spins) {
        relax();
        if ((spins & 63) == 63 && now_us() > deadline) {
          sleepers.fetch_add(1);
          if (epoch.load() == seen) wait_while_equal(&epoch, seen);
          sleepers.fetch_sub(1);
        }
      }
      seen = e;
      work(id, e);
    }
  }

  void grow(int wanted) {  // under busy
    for (; workers < wanted; ++workers) std::thread([this, id = workers] { serve(id); }).detach();
  }
};

inline std::atomic<Pool*> the_pool{nullptr};
inline thread_local bool inside_job = false;

inline void forget_pool_in_child() { the_pool.store(nullptr); }  // the parent's workers do not exist in a child

inline Pool* pool() {
  Pool* p = the_pool.load(std::memory_order_acquire);
  if (p) return p;
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, forget_pool_in_child); });
  Pool* fresh = new Pool;
  if (the_pool.compare_exchange_strong(p, fresh)) return fresh;
  delete fresh;
  return p;
}

template <typename F>
void call_piece(void* piece, int64_t i) {
  (*static_cast<F*>(piece))(i);
}

}  // namespace pieces_detail

// piece(i) for every i in [0, count), each exactly once, on this thread and up to threads - 1 pool workers; returns
// when all have run.
template <typename F>
void for_pieces(int64_t count, int64_t threads, F&& piece) {
  using namespace pieces_detail;
  const int64_t helpers = std::min<int64_t>(threads, count) - 1;
  if (helpers <= 0 || inside_job) {
    for (int64_t i = 0; i < count; ++i) piece(i);
    return;
  }
  Pool* p = pool();
  std::unique_lock<std::mutex> hold(p->busy, std::try_to_lock);
  if (!hold.owns_lock()) {  // another thread's job is running: do this one alone
    for (int64_t i = 0; i < count; ++i) piece(i);
    return;
  }
  inside_job = true;
  p->grow(static_cast<int>(helpers));
  using Piece = std::remove_reference_t<F>;
  p->fn.store(&call_piece<Piece>, std::memory_order_relaxed);
  p->context.store(const_cast<void*>(static_cast<const void*>(&piece)), std::memory_order_relaxed);
  p->count.store(count, std::memory_order_relaxed);
  p->helpers.store(helpers, std::memory_order_relaxed);
  p->done.store(0, std::memory_order_relaxed);
  const uint32_t job = p->epoch.load(std::memory_order_relaxed) + 1;
  p->claim.store(static_cast<uint64_t>(job) << 32, std::memory_order_release);
  p->epoch.store(job);
  if (p->sleepers.load() > 0) wake_all(&p->epoch);
  int64_t mine = 0;
  for (;;) {
    const int64_t i = static_cast<int64_t>(p->claim.fetch_add(1, std::memory_order_acq_rel) & 0xffffffffu);
    if (i >= count) break;
    piece(i);
    ++mine;
  }
  // Only pieces a worker claimed are left: wait for those, spinning briefly, then yielding the core (the worker
  // holding one may be waiting for it).
  for (int spins = 0; p->done.load(std::memory_order_acquire) + mine < count; ++spins) {
    if (spins < 2000)
      relax();
    else
      sched_yield();
  }
  inside_job = false;
}

}  // namespace openjamba
