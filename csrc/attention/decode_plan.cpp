// decode_plan.cpp: the host-side plan of paged decode attention.
//
// Given the batch's shape (sequences, heads, head_dim, the longest possible context, the
// dtype) and the GPU (its SMs, how many blocks of each kernel fit on one), the plan picks
//   * the kernel: tensor cores for bf16/fp16, CUDA cores for fp32 (choose_kernel);
//   * how many partitions each context is cut into (split-K, merged by decode_merge.cu):
//     enough blocks for one wave over every SM, never partitions too short to pay;
//   * wide blocks of 8 or 16 warps instead of 2 to 4 splits, one kv head per warp at one
//     full wave of equal lengths, fewer blocks per SM where that saves a wave.
// Each rule was measured; its comment gives the reason in short and the row of
// bench/results/README.md that holds the numbers. The plan depends on host values only
// (never on seq_lens in device memory), so a CUDA graph can capture the launch.
#include "attention/decode_plan.h"

#include <algorithm>
#include <array>
#include <stdexcept>
#include <string>

#include "attention/device_limits.h"
#include "cuda_check.h"

namespace tinyvllm {
namespace decode {
namespace {

constexpr int kMaxSplits = 256;        // more partitions than this would only add merge work
constexpr int kPartitionAlign = 64;    // partition sizes are multiples of this many tokens
constexpr int kMinPartition = 128;     // tensor cores: the shortest partition worth a split
constexpr int kBlocksPerSmWanted = 4;  // blocks per SM worth splitting the context for

int smem_optin() { return attn::cached_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(48 * 1024); }

// The tensor-core kernel needs 34 KB of shared memory per block at head_dim 64 and 66 KB at
// 128: every sm_80+ GPU allows that (the least, sm_86 and sm_89, allow 99 KB).
bool mma_fits(int head_dim) { return smem_optin() >= decode_mma_smem_bytes(head_dim); }

// Which kernel (plan.tensor_cores, plan.head_per_warp). An explicit impl that cannot run is
// an error, never a silent substitute.
void choose_kernel(DecodePlan& plan, DType dtype, int head_dim, int impl) {
  const std::string op = "paged_attention_decode: impl=" + std::to_string(impl);
  if (impl != -1 && impl != 0 && impl != 1 && impl != 3)
    throw std::runtime_error(op + " does not exist (-1 automatic, 0 CUDA cores, 1 tensor cores, 3 tensor cores "
                                  "with one kv head per warp)");
  plan.head_per_warp = impl == 3;
  plan.tensor_cores = dtype != DType::kFloat32;
  if (dtype == DType::kFloat32) {
    if (impl > 0) throw std::runtime_error(op + " (tensor cores) needs a bfloat16 or float16 cache");
    return;
  }
  if (impl == 0)
    throw std::runtime_error(op + " (CUDA cores) runs float32 caches only; its bfloat16/float16 version is v1 of "
                                  "dev/cuda/paged_attention_decode.cu");
  if (!mma_fits(head_dim))
    throw std::runtime_error(op + ": the tensor-core kernel needs " + std::to_string(decode_mma_smem_bytes(head_dim)) +
                             " bytes of shared memory per block at head_dim " + std::to_string(head_dim) +
                             "; this GPU allows " + std::to_string(smem_optin()));
}

// ---- Blocks per SM for a grid of more than one wave ----
// With r blocks per SM sharing its bandwidth, a block of a streaming kernel takes about r
// "units". A per-block trace (H200, Llama-1B) shows the first wave spread over every SM, and
// later blocks landing r at a time on the first SMs to free up. So n blocks cost
// ceil(n / SMs) units in one wave, else floor(n / (r SMs)) * r plus r for a partial wave,
// and fewer blocks per SM than fit can save a wave (768 blocks: 10 units at 5 per SM, 6 at 3).
// Used between one and two waves only (past two the waves drift apart and it measured either
// way), for blocks of at least 512 tokens (shorter ones are mostly start-up, which more
// blocks per SM hide), and below 1024 tokens only if it promises a fifth less time. Of 101
// shapes it changed 30: 29 faster (up to 16%), one 0.5% slower (bench/results/README.md,
// rows 33-36).
constexpr int kMinTokensForFewerBlocks = 512;
constexpr int kTokensForSmallGains = 1024;

int64_t wave_units(int64_t blocks, int per_sm, int num_sms) {
  const int64_t slots = int64_t(per_sm) * num_sms;
  if (blocks <= slots) return (blocks + num_sms - 1) / num_sms;
  return blocks / slots * per_sm + (blocks % slots ? per_sm : 0);
}

// Blocks per SM for a grid of `blocks` blocks of `tokens` tokens each, when `fit` fit.
int blocks_per_sm_for(int64_t blocks, int tokens, int fit, int num_sms) {
  const int64_t wave = int64_t(fit) * num_sms;
  if (fit <= 2 || tokens < kMinTokensForFewerBlocks || blocks <= wave || blocks >= 2 * wave) return fit;
  int best = fit;
  for (int r = fit - 1; r >= std::max(2, fit - 2); --r)
    if (wave_units(blocks, r, num_sms) < wave_units(blocks, best, num_sms)) best = r;
  if (tokens < kTokensForSmallGains && 5 * wave_units(blocks, best, num_sms) > 4 * wave_units(blocks, fit, num_sms))
    return fit;
  return best;
}

// Hold the plan's blocks per SM down to blocks_per_sm_for's choice by padding the block's
// shared memory; kept only if the runtime agrees that exactly r fit. `fit`: unpadded.
void plan_blocks_per_sm(DecodePlan& plan, int64_t blocks, int fit, int num_sms, DType dtype, int head_dim,
                        int group) {
  const int r = blocks_per_sm_for(blocks, plan.partition_size, fit, num_sms);
  if (r >= fit) return;
  DecodePlan held = plan;
  held.smem_bytes = attn::smem_to_hold_blocks_per_sm(r, plan.smem_bytes);
  if (held.smem_bytes <= smem_optin() && resident_blocks_per_sm(held, dtype, head_dim, group) == r) plan = held;
}

// Cut contexts of up to max_seq_len tokens into about `splits` partitions of at least
// min_part tokens (at most kMaxSplits), each a multiple of kPartitionAlign tokens. Rounding
// the size up may drop a split, so num_splits is recounted from it.
void set_partitions(DecodePlan& plan, int64_t splits, int max_seq_len, int min_part) {
  const int64_t by_len = (max_seq_len + min_part - 1) / min_part;
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, by_len, kMaxSplits}));
  int part = static_cast<int>((max_seq_len + splits - 1) / splits);
  part = (part + kPartitionAlign - 1) / kPartitionAlign * kPartitionAlign;
  plan.partition_size = part;
  plan.num_splits = (max_seq_len + part - 1) / part;
}

// ---- One kv head per warp ----
// A block of 4 kv heads of one sequence, each warp streaming all of its own head's tiles: no
// merge of warps, 4x fewer blocks. It saves the block starts after the first wave and the
// merges, where the usual grid needs several waves and this one fits in one (Llama 3.2 1B,
// batch 256: 2048 blocks or 512). But one wave has no later blocks to even out the SMs, so it
// pays only when the last level of the wave is at least 3/4 full, and not past 2048 tokens
// (the fixed cost it saves no longer covers its 0.4% slower stream); it lost past one wave and
// where it needed a split. Measured on H100s and H200s at Llama-1B heads: 0.3-4.3% faster
// where picked (bench/results/README.md, rows 71-72). So the automatic plan takes it
// for equal lengths, contexts up to 2048 tokens, groups up to 8, head_dim 64, one wave of at
// least 2.75 blocks per SM whose last level is at least 3/4 full. impl 3 forces it anywhere,
// splitting only where fewer than 2 blocks per SM would be left.
constexpr int kHeadPerWarpMinBlocksX4 = 11;  // 2.75 blocks per SM, times 4
constexpr int kHeadPerWarpMaxTokens = 2048;  // the longest context it is picked for

// n blocks of 4 kv heads on num_sms SMs, `fit` per SM at most.
bool head_per_warp_pays(int64_t n, int fit, int num_sms) {
  const int64_t c = (n + num_sms - 1) / num_sms;  // the most blocks any SM gets
  const int64_t full = n - (c - 1) * num_sms;     // SMs that get c of them
  return 4 * n >= kHeadPerWarpMinBlocksX4 * int64_t(num_sms) && c <= fit && 4 * full >= 3 * int64_t(num_sms);
}

DecodePlan plan_head_per_warp(DecodePlan plan, int64_t blocks, int max_seq_len, int fit, int num_sms) {
  plan.head_per_warp = true;
  plan.warps = kDecodeWarps;
  plan.head_chunks = 1;
  const int64_t target = int64_t(fit) * num_sms * 9 / 10;
  const int64_t splits = blocks >= target || blocks >= 2 * int64_t(num_sms) ? 1 : (target + blocks - 1) / blocks;
  set_partitions(plan, splits, max_seq_len, kMinPartition);
  return plan;
}

// equal_lengths: the caller says the lengths are about equal (see plan_decode). skewed_sum:
// > 0 if the longest sequence is more than 3x the mean: the sum of the lengths (rounded up to
// 256), else 0.
DecodePlan make_decode_plan(int num_seqs, int num_heads, int num_kv_heads, int head_dim, int max_seq_len,
                            bool equal_lengths, int64_t skewed_sum, int num_sms, DType dtype, int impl) {
  DecodePlan plan{};
  plan.warps = kDecodeWarps;
  plan.smem_bytes = decode_mma_smem_bytes(head_dim, kDecodeWarps);
  choose_kernel(plan, dtype, head_dim, impl);
  const int group = std::max(1, num_heads / std::max(1, num_kv_heads));
  if (plan.tensor_cores) {
    plan.gmax = kMmaRows;
  } else {
    plan.gmax = group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
  }
  plan.head_chunks = (group + plan.gmax - 1) / plan.gmax;
  if (plan.head_per_warp && group > kMmaRows)
    throw std::runtime_error("paged_attention_decode: impl=3 (one kv head per warp) needs at most " +
                             std::to_string(kMmaRows) + " query heads per kv head, got " + std::to_string(group));
  max_seq_len = std::max(max_seq_len, 1);
  const int64_t base = std::max<int64_t>(1, int64_t(num_seqs) * num_kv_heads * plan.head_chunks);
  // As many blocks as fit on the SMs at once, at most kBlocksPerSmWanted per SM: 4 blocks of
  // the tensor-core kernel keep 64 KB per SM in flight at head_dim 64, which covers the DRAM
  // latency; more blocks only add start-ups and merges (H200, 64 x 1024: 512 blocks 37.4 us,
  // split into 1024 and merged 41 us).
  const int fit = resident_blocks_per_sm(plan, dtype, head_dim, group);
  const int64_t hpw_blocks = int64_t(num_seqs) * ((num_kv_heads + kDecodeWarps - 1) / kDecodeWarps);
  if (plan.head_per_warp) return plan_head_per_warp(plan, hpw_blocks, max_seq_len, fit, num_sms);  // impl 3
  if (impl == -1 && plan.tensor_cores && equal_lengths && max_seq_len <= kHeadPerWarpMaxTokens &&
      group <= kMmaRows / 2 && head_dim == 64) {
    DecodePlan hpw = plan;
    hpw.head_per_warp = true;
    const int hfit = resident_blocks_per_sm(hpw, dtype, head_dim, group);
    if (head_per_warp_pays(hpw_blocks, hfit, num_sms)) return plan_head_per_warp(hpw, hpw_blocks, max_seq_len, hfit, num_sms);
  }
  const int per_sm = std::min(fit, kBlocksPerSmWanted);
  int64_t target = int64_t(per_sm) * num_sms;
  // Tensor cores: a wave 90% full is full enough; splitting it would double the blocks, each
  // with its own fixed cost, and add the merge.
  if (plan.tensor_cores) target = target * 9 / 10;
  int64_t splits = base >= target ? 1 : (target + base - 1) / base;
  // Equal lengths and 4-warp blocks enough to stream on every SM (2 per SM at head_dim 64,
  // 2.5 at 128): no split, which would only add the merge and a partial second wave (H200,
  // batch 34-59: up to 23% faster at head_dim 64; at 128 7% slower below 2.5 per SM). Without
  // the caller's word that the lengths are equal, a long sequence among short ones needs the
  // split, or its blocks run alone at the end (bench/results/README.md, row 40).
  const int64_t min_blocks_x2 = head_dim > 64 ? 5 : 4;  // twice the blocks per SM wanted
  if (plan.tensor_cores && equal_lengths && 2 * base >= min_blocks_x2 * num_sms) splits = 1;
  // Skewed lengths (the longest more than 3x the mean): the long sequences' blocks would
  // stream alone on a few SMs at the end. Cut every context into pieces sized by the batch's
  // total work (about `target` blocks' worth of tokens, never more than twice the mean): the
  // short ones stay whole, the long ones become several blocks. One 8192-token sequence among
  // 1024s on an H200: batch 8 22.9 -> 17.3 us, 64 90.7 -> 49.9; merely ragged batches (the
  // longest within 2.3x the mean) were mostly slower cut, and keep their plan
  // (bench/results/README.md, row 48).
  bool skewed_split = false;
  if (plan.tensor_cores && skewed_sum > 0) {
    const int64_t per_head = num_kv_heads * int64_t(plan.head_chunks);
    const int64_t pieces = std::max<int64_t>(1, (target + per_head - 1) / per_head);  // blocks per kv head
    const int64_t mean = (skewed_sum + num_seqs - 1) / num_seqs;
    const int64_t by_work = ((skewed_sum + pieces - 1) / pieces + 255) / 256 * 256;
    const int64_t by_mean = (2 * mean + 255) / 256 * 256;
    const int64_t piece = std::max<int64_t>(kMinPartition, std::min(by_work, by_mean));
    const int64_t cut = (max_seq_len + piece - 1) / piece;
    if (cut > splits) {
      splits = cut;
      skewed_split = true;
    }
  }
  set_partitions(plan, splits, max_seq_len, plan.tensor_cores ? kMinPartition : kPartitionAlign);
  // 2 to 4 splits become one wider block: 8 or 16 warps take the whole context and merge in
  // shared memory, and the merge kernel (which waits for the whole first grid) is gone. As
  // many warps as the split blocks had, if all the wide blocks fit on the GPU at once (a
  // second wave costs more than the merge), else 8 warps if those fit. H200, Llama-1B: batch
  // 8 x 512 9.4-10.6 -> 8.5 us, 32 x 1024 24.3 -> 21.7; with more splits it won some shapes
  // and lost others (bench/results/README.md, row 28). Not for a skewed
  // batch: a wide block would take a long sequence whole again.
  if (plan.tensor_cores && !skewed_split && plan.num_splits > 1 && plan.num_splits <= 4) {
    for (int warps = plan.num_splits == 2 ? 2 * kDecodeWarps : 4 * kDecodeWarps; warps >= 2 * kDecodeWarps; warps /= 2) {
      // (16 warps at head_dim 128 would need 263 KB: no GPU has that, and no such kernel exists.)
      if (decode_mma_smem_bytes(head_dim, warps) > smem_optin() || (head_dim == 128 && warps > 2 * kDecodeWarps)) continue;
      DecodePlan wide = plan;
      wide.warps = warps;
      wide.smem_bytes = decode_mma_smem_bytes(head_dim, warps);
      set_partitions(wide, 1, max_seq_len, kPartitionAlign);
      if (base <= int64_t(resident_blocks_per_sm(wide, dtype, head_dim, group)) * num_sms) {
        plan = wide;
        break;
      }
    }
  }
  if (plan.tensor_cores && !skewed_split && plan.warps == kDecodeWarps)  // (its wave model: equal blocks)
    plan_blocks_per_sm(plan, base * plan.num_splits, fit, num_sms, dtype, head_dim, group);
  return plan;
}

}  // namespace

int resident_blocks_per_sm(const DecodePlan& plan, DType dtype, int head_dim, int group) {
  if (!plan.tensor_cores) return attn::prepare_kernel(cuda_cores_kernel_for(head_dim, plan.gmax), kDecodeThreads, 0);
  const void* kernel = tensor_cores_kernel_for(dtype, head_dim, group > 8, plan.warps, plan.head_per_warp);
  return attn::prepare_kernel(kernel, plan.warps * 32, plan.smem_bytes);
}

// The op asks for its plan twice per call (the bindings size the workspace first, then
// launch), and the model asks again for the same shapes in every layer: remember the last
// answer per thread, so the repeats cost a comparison.
//
// sum_seq_lens (-1: not known) says whether the lengths are about equal (their mean at least
// 4/5 of max_seq_len) or skewed (the mean under 1/3 of it); for a skewed batch the pieces are
// sized from the sum rounded up to 256 tokens, so that a sum growing by a token per sequence
// per step rarely re-plans. (A CUDA graph keeps the plan it captured: replayed for other
// lengths it stays correct, if slower.)
DecodePlan plan_decode(int num_seqs, int num_heads, int num_kv_heads, int head_dim, int max_seq_len,
                       int64_t sum_seq_lens, int num_sms, DType dtype, int impl) {
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  const bool equal_lengths = sum_seq_lens >= 0 && 4 * int64_t(num_seqs) * max_seq_len <= 5 * sum_seq_lens;
  const bool skewed = sum_seq_lens >= 0 && 3 * sum_seq_lens < int64_t(num_seqs) * max_seq_len;
  const int64_t skewed_sum = skewed ? std::max<int64_t>(256, (sum_seq_lens + 255) / 256 * 256) : 0;
  const std::array<int64_t, 11> key{num_seqs,   num_heads, num_kv_heads,  head_dim, max_seq_len, equal_lengths,
                                    skewed_sum, num_sms,   static_cast<int>(dtype), impl, dev};
  thread_local std::array<int64_t, 11> last_key{};
  thread_local DecodePlan last_plan{};
  thread_local bool have_last = false;
  if (!have_last || key != last_key) {
    last_plan = make_decode_plan(num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len, equal_lengths,
                                 skewed_sum, num_sms, dtype, impl);
    last_key = key;
    have_last = true;
  }
  return last_plan;
}

}  // namespace decode

DecodePlanInfo paged_attention_decode_plan(int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                                           int max_seq_len, int64_t sum_seq_lens, DType dtype, int impl) {
  using namespace decode;
  const DecodePlan plan = plan_decode(num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len, sum_seq_lens,
                                      attn::num_sms_of_current_device(), dtype, impl);
  const int group = std::max(1, num_heads / std::max(1, num_kv_heads));
  return DecodePlanInfo{plan.tensor_cores, plan.num_splits, plan.partition_size, plan.warps,
                        resident_blocks_per_sm(plan, dtype, head_dim, group), plan.tensor_cores ? plan.smem_bytes : 0,
                        plan.head_per_warp};
}

}  // namespace tinyvllm
