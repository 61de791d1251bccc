// Dynamic work split over torch's intra-op threads, and the one mapping of work items to
// (batch, head, query block) that every variant uses.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

namespace nanogpt {

// Problems below kSerialBelow multiply-adds in all (a KV-cache decoding step, say) run on the
// calling thread: waking a second thread costs more than it saves.
constexpr int64_t kSerialBelow = int64_t(1) << 20;

// Runs work(item, slot) for every item in [0, n), item_cost multiply-adds each. Threads take
// items from a shared counter, because causal rows and blocks differ in cost and a static
// split would leave one of two threads with three quarters of the work; callers order items
// heaviest first. `slot` in [0, threads) is the calling thread's index into per-thread
// scratch. Uses at::parallel_for, so torch.set_num_threads and nesting in torch's own
// parallel regions (where it runs serially) are respected. Work below serial_below multiply-adds
// in all runs on the calling thread.
template <class Work>
void parallel_items(int64_t n, int64_t threads, int64_t item_cost, const Work& work,
                    int64_t serial_below = kSerialBelow) {
  if (threads == 1 || n * item_cost < serial_below) {
    for (int64_t item = 0; item < n; ++item) work(item, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t slot, int64_t /*slot_end*/) {
    for (int64_t item = next++; item < n; item = next++) work(item, slot);
  });
}

// Runs work(b, h, block, slot) for query blocks [0, blocks) of every (b, h) in B×H, heaviest
// first: item t is block blocks-1-t/(B·H) of head t%(B·H), so the blocks of the longest causal
// rows start first and the short ones fill the end. A block is rows [block·br, block·br + br).
template <class Work>
void parallel_blocks(int64_t B, int64_t H, int64_t blocks, int64_t threads, int64_t block_cost, const Work& work) {
  const int64_t BH = B * H;
  parallel_items(BH * blocks, threads, block_cost, [&](int64_t t, int64_t slot) {
    const int64_t bh = t % BH;
    work(bh / H, bh % H, blocks - 1 - t / BH, slot);
  });
}

}  // namespace nanogpt
