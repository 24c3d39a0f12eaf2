// paged_attention.cu: decode attention over the paged KV cache (one new token per sequence).
//
// ---- The math ---------------------------------------------------------------
// For one query head with query vector q (head_dim numbers) and the sequence's
// cached keys k_0..k_{n-1} and values v_0..v_{n-1}:
//
//     s_j = scale * (q . k_j)                  one score per cached token
//     p_j = exp(s_j - max_i s_i) / sum_i exp(s_i - max_i s_i)      softmax
//     out = sum_j p_j * v_j                    a weighted average of the values
//
// Subtracting the max changes nothing mathematically (it cancels between the
// numerator and the denominator) but keeps exp() from overflowing.
//
// Causal mask: token t may only look at positions <= t. The new decode token is
// the LAST position of its sequence, so every cached key is allowed: decode
// needs no mask (prefill_attention.cu does).
//
// Online softmax (one pass): we do not want to store all n scores, find their
// max, then go back. Keep three running quantities while reading tokens:
//     m   the largest score seen so far
//     l   sum of exp(s_j - m) over tokens seen so far
//     acc sum of exp(s_j - m) * v_j over tokens seen so far (a head_dim vector)
// When a new token with score s arrives:
//     m' = max(m, s);   alpha = exp(m - m')          (how much the old max was too small)
//     l' = l * alpha + exp(s - m');   acc' = acc * alpha + exp(s - m') * v
// Every old term was exp(s_j - m); multiplying by alpha = exp(m - m') turns it into
// exp(s_j - m'), so after the last token acc / l is exactly the softmax average.
// Two partial states (m1,l1,acc1), (m2,l2,acc2) over disjoint token sets merge the
// same way: m = max(m1,m2), l = l1 e^(m1-m) + l2 e^(m2-m), acc likewise. That
// merge is what lets many threads, warps and even thread blocks each take a slice
// of the tokens and combine their results at the end.
//
// We use 2^x instead of e^x (one hardware instruction): fold log2(e) into the
// scale, s' = s * log2(e), and e^(s - m) = 2^(s' - m').
//
// GQA (grouped-query attention): num_heads query heads share num_kv_heads k/v
// heads; query head h reads kv head h / group, group = num_heads / num_kv_heads
// (Llama 3.2 1B: 32 and 8, group 4). Decode is limited by reading the cache from
// memory, so one thread block computes ALL the query heads of a group together:
// each k/v byte is loaded once and used `group` times.
//
// ---- Two kernels -----------------------------------------------------------------
// This file holds two decode kernels that compute the same thing:
//   * paged_attention_decode_kernel (CUDA cores): every multiply is a plain fma in
//     float32. The easiest to read, and the one fp32 caches use.
//   * paged_attention_decode_mma_kernel (tensor cores): bf16/fp16 caches. Same online
//     softmax, but Q K^T and P V go to mma.sync, as in prefill_attention.cu. Its tiles
//     are copied to shared memory either by cp.async (the default) or by Hopper's copy
//     engine, TMA (impl=2; measured no faster, kept as the tested alternative: tma.cuh).
// Why two? Decode reads every k/v byte once and does little math per byte, so it
// should be bound by memory. But on the CUDA cores "little" is still a lot: for each
// 16 bytes of k/v a thread converts 8 numbers and does 8 fmas PER QUERY HEAD of the
// group, plus shuffles and exps: about 120 instructions per 32 bytes. At H100/H200
// bandwidth (~16 bytes per SM per clock) that is more than half of what the SM can
// issue, so the loads stop being issued on time and the kernel tops out well below
// the bandwidth (on an H200, Llama-1B shapes: 58-86% of copy bandwidth, 0.57-0.84x
// torch SDPA). One mma.m16n8k16 does 2048 multiply-adds in one instruction; with it
// the same work is ~5x fewer instructions, the kernel waits on memory only, which is
// what decode should do: the same benchmark gives 86-104% of the copy bandwidth at
// 64k tokens and more (a kernel that only reads can pass a copy), 0.96-1.38x SDPA.
//
// ---- The shape of the CUDA-core kernel ------------------------------------------
// Paged cache: key_cache[num_blocks][num_kv_heads][block_size][head_dim]. Token t
// of a sequence lives in physical block block_table[t / block_size], row
// t % block_size. One token's key row for one kv head is head_dim contiguous
// numbers: 128 bytes for bf16 and head_dim 64.
//
// CUDA in two sentences: a kernel runs as a grid of thread blocks (CTAs); a block
// is a few warps of 32 threads that execute in lockstep and can exchange
// registers with __shfl_xor_sync, and a block's warps share fast on-chip memory.
//
//   grid  = (num_kv_heads * head_chunks, num_seqs, num_splits)
//   block = 4 warps
// Each block handles one (sequence, kv head, slice of the context). A key row is
// read by TPR = head_dim / VEC threads, each loading 16 bytes (VEC = 8 bf16/fp16
// or 4 fp32); a warp therefore reads RPW = 32 / TPR rows at once (4 rows for
// bf16, head_dim 64: 512 contiguous bytes), and U such row-sets per step so that
// several loads are in flight per thread (memory latency is ~1 us; only many
// outstanding loads fill the bandwidth). Each thread multiplies its 16-byte slice
// of k with its slice of every query head of the group, and the TPR threads of a
// row add their partial dot products with shuffles. Each thread then keeps its own
// online-softmax state (m, l for each head, acc for its slice of head_dim); at the
// end the states are merged across the rows of a warp (shuffles), then across
// warps (shared memory).
//
// Flash-decoding (split-K over the context): with batch 1 and 8 kv heads there would be
// only 8 blocks for 132 SMs. So the context is cut into num_splits partitions of
// partition_size tokens, one block each; each block writes its unnormalised (m, l, acc)
// into a workspace, and a small second kernel merges the partitions of each (sequence,
// head). The split count is chosen on the host from num_seqs * num_kv_heads against the
// SM count and the longest possible context (plan_decode below); a batch of about equal
// lengths with blocks enough for every SM is not split at all; in a skewed one (the
// longest more than 3x the mean) the long sequences are cut into pieces sized by the
// batch's total work. A sequence that fits into one partition is finished by the first
// kernel directly, and the second kernel skips it. The second kernel is launched
// "programmatically dependent" (launch_reduce), so its launch overlaps the first kernel
// instead of following it. Still, it can only start its work once the whole first grid
// has finished; so where 4-warp blocks would need only 2 to 4 splits, the tensor-core
// kernel runs one block of 8 or 16 warps per sequence instead (the same warps, the same
// tiles), whose warps merge in shared memory (plan_decode). And where the blocks need
// between one and two waves, the plan may allow fewer blocks per SM than fit, so that
// the second wave spreads over every SM (blocks_per_sm_for).
//
// CUDA graphs: the launcher allocates nothing (the workspace is passed in), never
// reads device memory on the host, and sizes the grid from max_seq_len, an upper
// bound known on the host (the block table's capacity), not from seq_lens.
#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#include "attention/attention_utils.cuh"
#include "attention/tma.cuh"
#include "ops.h"

namespace tinyvllm {
namespace {

using attn::fast_exp2;
using attn::ld_global_16;
using attn::Vec16;

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kMaxSplits = 256;      // more partitions than this would only add merge work
constexpr int kPartitionAlign = 64;  // partition sizes are multiples of this many tokens
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kEmptyMax = -1e30f;  // "no token yet": finite, so (kEmptyMax - kEmptyMax) = 0, not NaN

struct DecodeParams {
  void* out;
  const void* query;
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  int num_heads;
  int num_kv_heads;
  int group;        // num_heads / num_kv_heads
  int head_chunks;  // ceil(group / GMAX): blocks per kv head when the group exceeds GMAX
  int block_size_log2;
  int max_blocks_per_seq;
  int64_t q_row_stride;
  float scale_log2;    // scale * log2(e)
  int partition_size;  // tokens per split
  int num_splits;
  float* ws_acc;  // [num_seqs, num_heads, num_splits, head_dim]
  float* ws_m;    // [num_seqs, num_heads, num_splits]
  float* ws_l;    // [num_seqs, num_heads, num_splits]
  int num_blocks;  // blocks in the cache (< 2^31, checked by the bindings): an entry outside [0, num_blocks) is never followed
  int* errors;     // kernel_error_flags() (ops.h)
};

struct DecodePlan {
  bool tensor_cores;  // the mma kernel (bf16/fp16) or the CUDA-core kernel (any dtype)
  bool tma;           // mma kernel only: tiles loaded by the copy engine (TMA) instead of cp.async
  int gmax;           // query heads per block (CUDA cores: a power of two >= the group, at most 8; mma: 16)
  int head_chunks;    // blocks per kv head
  int num_splits;
  int partition_size;
  int warps;          // mma kernel: warps per block (4, 8 or 16; the CUDA-core kernel always has 4)
  bool head_per_warp; // mma kernel: each warp takes one kv head whole (a block: 4 kv heads of one
                      // sequence; no merge of warps); see "One kv head per warp" below
  int smem_bytes;     // mma kernel: dynamic shared memory per block, padded where the plan holds
                      // down the blocks per SM (plan_blocks_per_sm)
};

// ---- tensor-core kernel constants ----
constexpr int kTile = 16;      // tokens per warp step: the k=16 of P V, two n=8 tiles of Q K^T
constexpr int kStages = 2;     // pipeline depth of each warp: 1 tile in flight while 1 is used (see issue())
constexpr int kMmaRows = 16;   // query heads per block: the M of mma.m16n8k16
constexpr int kMinPartition = 128;  // tensor-core kernel: shortest partition worth a split
constexpr int kBlocksPerSmWanted = 4;  // blocks per SM worth splitting the context for (plan_decode)

// Shared memory the tensor-core kernel asks for per block, by head_dim and warps per block
// (constexpr: the kernels size their launch with it, the plan checks it against the GPU).
constexpr int decode_mma_smem_bytes(int head_dim, int warps = kDecodeWarps) {
  // Per warp: kStages stages of a K tile and a V tile (dense, swizzled rows; see the
  // kernel), one 8-byte mbarrier per stage (used by the TMA loader), plus 1 KB to align
  // the tiles to 1024 bytes, the swizzle pattern's period.
  return warps * kStages * (2 * kTile * head_dim * 2 + 8) + 1024;
}


// Can this GPU run the tensor-core kernel at this head_dim? It needs 34 KB of shared
// memory per block at head_dim 64 and 66 KB at 128: every sm_80+ GPU allows that
// (the least, sm_86 and sm_89, allow 99 KB).
bool mma_fits(int head_dim) {
  return attn::cached_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(48 * 1024) >=
         decode_mma_smem_bytes(head_dim);
}

// How many blocks of the planned kernel fit on one SM at once (defined with the
// launchers, below the kernels: it asks the CUDA runtime about the kernel itself).
int resident_blocks_per_sm(const DecodePlan& plan, DType dtype, int head_dim, int group);

std::string shared_memory_error(int impl, int head_dim) {
  return "paged_attention_decode: impl=" + std::to_string(impl) + " needs " +
         std::to_string(decode_mma_smem_bytes(head_dim)) + " bytes of shared memory per block at head_dim " +
         std::to_string(head_dim) + "; this GPU allows " +
         std::to_string(attn::cached_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(0));
}

// Which kernel (sets plan.tensor_cores, plan.tma and plan.head_per_warp):
//   impl -1 automatic: tensor cores with cp.async where they fit, else CUDA cores
//           (fp32: always CUDA cores); the plan may give each warp a kv head of its own
//   impl  0 CUDA cores;  1 tensor cores, cp.async loads, the warps of a block share one
//           kv head;  2 the same with TMA loads;  3 tensor cores, cp.async loads, one kv
//           head per warp (any shape; the automatic plan picks it only where it measured
//           faster, see make_decode_plan)
// An explicit impl that cannot run here is an error, never a silent substitute.
// Why not TMA automatically on sm_90+? Measured on an H200 (Llama-1B shapes), it is
// no faster anywhere: 1-6% slower at batch 8 to 256 in the same run; cp.async also
// runs on sm_80+.
void choose_kernel(DecodePlan& plan, DType dtype, int head_dim, int impl) {
  plan.tensor_cores = false;
  plan.tma = false;
  plan.head_per_warp = impl == 3;
  if (impl == 0) return;
  if (dtype == DType::kFloat32) {
    if (impl > 0)
      throw std::runtime_error("paged_attention_decode: impl=" + std::to_string(impl) +
                               " (tensor cores) needs a bfloat16 or float16 cache");
    return;
  }
  if (impl == 2 && !tma::available())
    throw std::runtime_error("paged_attention_decode: impl=2 (TMA) needs an sm_90+ GPU (Hopper or newer) and a "
                             "driver that provides cuTensorMapEncodeTiled");
  if (impl > 0 && !mma_fits(head_dim)) throw std::runtime_error(shared_memory_error(impl, head_dim));
  plan.tma = impl == 2;
  plan.tensor_cores = plan.tma || impl == 1 || impl == 3 || mma_fits(head_dim);
}

// ---- Blocks per SM for a grid of more than one wave ----
// Every block of the streaming kernel reads the same number of bytes (equal lengths),
// and the r blocks on an SM share its bandwidth, so with r blocks per SM a block runs
// for about r "units" (a unit: the time one block would take alone on its SM). The
// hardware hands out blocks in two ways, both seen in a per-block trace (SM id, start
// and end time) on an H200 at Llama-1B shapes:
//   * the first wave is spread over all SMs: 512 blocks sit 3 or 4 to an SM, and take
//     ceil(blocks / SMs) units;
//   * after that, a slot is refilled as soon as it frees up, and an SM frees all its
//     slots at about the same time, so the next blocks land on the first SMs to finish,
//     r at a time. At batch 96 x 1024 (768 blocks, 660 slots) the 108 blocks past the
//     first wave ran on 24 SMs, 5 to an SM, while the other 108 SMs idled: that tail
//     took another r units on a fifth of the GPU (61.5 us; 52.9 with 3 blocks per SM).
// So n blocks at r per SM cost ceil(n / SMs) units in one wave, else
// floor(n / (r SMs)) * r units plus r more for a partial last wave, and holding r
// below what fits can save a wave: 768 blocks cost 10 units at 5 per SM, 6 at 3.
// The model is used between one and two waves only. Past two, blocks on some SMs
// stream 25% faster than on others (the same trace), the waves drift apart, and the
// measurements went either way (batch 168-256: one block less per SM was 10% slower
// to 9% faster, shape by shape, about even on average). And a block also pays a
// start-up (two DRAM round trips) that the other blocks of its SM hide, better the
// more of them there are: blocks of fewer than 512 tokens (8 tiles per warp) are
// mostly start-up, and keep every block that fits; below 1024 tokens the model must
// promise at least a fifth less time (96 x 512: 6 units against 10, 11% faster; 144 x
// 512: 9 against 10 would have been 3% slower).
// Measured on H200s, Llama-1B shapes, same buffers (bench/results/
// h200-2026-11-27-blocks-per-sm/): of 101 shapes (batch 40-256, context 128-4096,
// head_dim 64/128) the rule changes 30; 29 got faster, by up to 16%, one 0.5% slower.
constexpr int kMinTokensForFewerBlocks = 512;
constexpr int kTokensForSmallGains = 1024;

inline int64_t wave_units(int64_t blocks, int per_sm, int num_sms) {
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

// Hold the plan's blocks per SM down to blocks_per_sm_for's choice, by padding the
// block's shared memory (attn::smem_to_hold_blocks_per_sm). Kept only if the runtime
// agrees that exactly r fit.
// `fit`: how many blocks of the plan's kernel fit on an SM unpadded.
void plan_blocks_per_sm(DecodePlan& plan, int64_t blocks, int fit, int num_sms, DType dtype, int head_dim,
                        int group) {
  const int r = blocks_per_sm_for(blocks, plan.partition_size, fit, num_sms);
  if (r >= fit) return;
  DecodePlan held = plan;
  held.smem_bytes = attn::smem_to_hold_blocks_per_sm(r, plan.smem_bytes);
  if (held.smem_bytes <= attn::cached_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(48 * 1024) &&
      resident_blocks_per_sm(held, dtype, head_dim, group) == r)
    plan = held;
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
// The usual block is one (sequence, kv head): its 4 warps take every 4th tile of that
// head's context, and at the end merge their 4 online-softmax states in shared memory.
// The other shape: a block holds 4 kv heads of one sequence, one per warp, and each warp
// streams ALL the tiles of its own head. Its state is then the head's whole answer, so
// the warp normalises and stores it itself: no merge, no barrier, and 4x fewer blocks.
// Where does that pay? Where the usual grid needs several waves and the new one fits in
// one: Llama 3.2 1B at batch 256 is 2048 usual blocks (3.1 waves of 5 per SM on 132 SMs)
// or 512 (3.9 per SM, one wave). Every block start after the first wave (a table and a
// tile round trip, 2.8-4.4 us under load) and every merge is gone.
// But one wave has no later blocks to even out the SMs: with n blocks on S SMs, some SMs
// get c = ceil(n / S) blocks and the rest c - 1, and those with c set the end. Measured on
// an H100 (Llama-1B heads, equal lengths, same buffers, 128-2048 tokens;
// bench/results/h100-h200-2026-11-27-head-per-warp/), by the share of SMs that get c blocks:
//   0.76-1.00 (batch 184-192, 248-264, 314-330): 0.3-4.3% faster at 128-1024 tokens (256 x 512:
//             96.0 -> 94.0 us, SDPA 94.5), -0.7 to +3.7% at 2048-4096;
//   0.61-0.64 (240, 304): 0.2-0.6% faster at 1024 tokens;
//   0.03-0.42 (136-160, 200-224, 288): from 512 tokens 2.5% slower to 0.8% faster,
//             slower in 17 of 21 measurements (faster at 128 tokens).
// On an H200 the same picks gained more at 512-1024 tokens (0.4-7.6%; 256 x 128: 10%).
// Past 2048 tokens it gains nothing: what it saves is a fixed cost (batch 256 on an
// H100: 8.9 -> 6.1-6.4 us), and its streaming rate is 0.4% slower (one wave, no later
// blocks to even out the SMs), which by 4096 tokens eats the saving (256 x 4096: -0.3 to
// 0% on the H100, -0.6% on the H200).
// It also lost past one wave (batch 512: 2.3-3.5%) and wherever it needed a split to fill
// the GPU (batch 32-128: the merge kernel, up to 8% slower). And it needs lengths about
// equal, or a long sequence's warp streams alone at the end. So the automatic plan takes
// it only for equal lengths (sum_seq_lens known), contexts of at most 2048 tokens, groups
// of at most 8 (one mma row block holds a warp's heads in rows 0-7) and head_dim 64
// (where it was measured), at one wave of at least 2.75 blocks per SM whose last level is
// at least 3/4 full. impl 3 forces it anywhere (the tests do), splitting only where fewer
// than 2 blocks per SM would be left.
constexpr int kHeadPerWarpMinBlocksX4 = 11;  // 2.75 blocks per SM, times 4
constexpr int kHeadPerWarpMaxTokens = 2048;  // the longest context it is picked for

// The automatic rule above: n blocks of 4 kv heads on num_sms SMs, `fit` per SM at most.
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

// Choose how many blocks work on each (sequence, kv head): enough to fill every SM
// once (one "wave" of resident blocks), but never partitions shorter than a minimum,
// below which the merge costs more than the extra parallelism gains.
//
// equal_lengths: the caller says the lengths are about equal (see plan_decode).
// skewed_sum: > 0 if the caller says the longest sequence is more than 3x the mean
// length: the sum of the lengths (rounded up to 256), else 0 (see the skewed rule below).
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
  // Aim for as many blocks as fit on the SMs at once (asked of the runtime), but at most
  // kBlocksPerSmWanted per SM: four blocks of the tensor-core kernel keep 64 KB per SM in
  // flight at head_dim 64, which covers the DRAM latency, and more blocks than that only
  // add their start-up and the merge (measured on an H200 with 5 blocks per SM: batch 64
  // x 1024 in 512 blocks 37.4 us, split into 1024 blocks and merged 41 us).
  const int fit = resident_blocks_per_sm(plan, dtype, head_dim, group);
  const int64_t hpw_blocks = int64_t(num_seqs) * ((num_kv_heads + kDecodeWarps - 1) / kDecodeWarps);
  if (plan.head_per_warp) return plan_head_per_warp(plan, hpw_blocks, max_seq_len, fit, num_sms);  // impl 3
  if (impl == -1 && plan.tensor_cores && !plan.tma && equal_lengths && max_seq_len <= kHeadPerWarpMaxTokens &&
      group <= kMmaRows / 2 && head_dim == 64) {
    DecodePlan hpw = plan;
    hpw.head_per_warp = true;
    const int hfit = resident_blocks_per_sm(hpw, dtype, head_dim, group);
    if (head_per_warp_pays(hpw_blocks, hfit, num_sms)) return plan_head_per_warp(hpw, hpw_blocks, max_seq_len, hfit, num_sms);
  }
  const int per_sm = std::min(fit, kBlocksPerSmWanted);
  int64_t target = int64_t(per_sm) * num_sms;
  // Tensor cores: a wave that is 90% full is full enough; splitting it would double the
  // blocks, each with its own fixed cost, and add the merge.
  if (plan.tensor_cores) target = target * 9 / 10;
  int64_t splits = base >= target ? 1 : (target + base - 1) / base;
  // Equal lengths and enough 4-warp blocks to stream on every SM (2 per SM at head_dim
  // 64, 2.5 at 128): splitting only adds the merge and a partial second wave, and there
  // is no long sequence whose blocks it could shorten. Measured on an H200 (Llama-1B
  // heads, batch 34-59, 512-8192 tokens, same buffers), one block per (sequence, kv
  // head) against the split: head_dim 64 up to 23% faster (46 x 512: 22.3 -> 17.2 us;
  // 42 x 1024: 31.4 -> 26.1), 0-3% at 8192 tokens; head_dim 128 faster from 2.5 blocks
  // per SM on (42 x 512: 32.1 -> 27.5), but 7% SLOWER at 2.06 (34 x 4096: 143 -> 153).
  // With one long sequence among short ones the split is what keeps the long one's
  // blocks from running alone at the end (48 x 8192 among 1024s: 53 us split, 82
  // unsplit), so without the caller's word that the lengths are about equal
  // (sum_seq_lens, see plan_decode) the split stays.
  const int64_t min_blocks_x2 = head_dim > 64 ? 5 : 4;  // twice the blocks per SM wanted
  if (plan.tensor_cores && equal_lengths && 2 * base >= min_blocks_x2 * num_sms) splits = 1;
  // Skewed lengths (the longest more than 3x the mean, known from sum_seq_lens): the
  // blocks of the long sequences take that much longer than the rest, and however the
  // others are spread, they end up streaming alone on a few SMs while the rest idle. So
  // cut the contexts into pieces sized by the batch's TOTAL work: about `target` blocks'
  // worth of tokens each (sum / (target / kv heads)), and never more than twice the mean.
  // The short sequences stay whole, the long ones become several blocks, merged as for any
  // split; no wide blocks, which would take a long sequence whole again. Measured on an
  // H200 (Llama-1B heads, in the scheduler's order), one 8192-token sequence among 1024s:
  // batch 8 22.9 -> 17.3 us (256-token pieces), 16 39.1 -> 21.0 (512), 48 53.0 -> 38.2
  // (1024), 128 111 -> 85 (2304), 256 161 -> 150 (2304); and with the committed rule (768
  // at batch 32, 1280 at 64): 32 54.0 -> 31.5, 64 90.7 -> 49.9. Merely ragged batches (the
  // longest within 2-2.3x the mean: lengths uniform in 100-2048 or 1-8192, half 512 and
  // half 4096) keep their plan: cut the same way, most were 3-9% slower, two 4-5% faster
  // (bench/results/h200-2026-11-27-decode-gap/, section 7).
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
  // A few splits (2 to 4) become one wider block instead: 8 or 16 warps take the whole
  // context, and the block merges its warps' states in shared memory, as every block
  // does. The merge kernel (a second launch that waits for the whole first grid, then
  // reads the workspace back) is gone. First choice: as many warps as the split blocks
  // had (8 for 2 splits, 16 for 3 or 4), the same warps reading the same tiles. Only if
  // all the wide blocks fit on the GPU at once: a 16-warp block needs 129 KB of shared
  // memory, so one fits per SM, and a second wave costs more than the merge. If they do
  // not, 8-warp blocks (two per SM) with fewer warps than the splits had, if those fit.
  // Measured on an H200 (Llama-1B shapes, same buffers): batch 8 x 512 9.4-10.6 -> 8.5
  // us, 16 x 512 12.0 -> 10.5, 32 x 1024 24.3 -> 21.7 (8 warps), 24 x 512 14.9 -> 12.3
  // (8 warps for 3 splits: 192 blocks of 16 warps would need two waves). With more than
  // 4 splits, wider blocks that still need the merge won some shapes and lost others.
  // (Not for a skewed batch: a wide block would again take a long sequence whole.)
  if (plan.tensor_cores && !plan.tma && !skewed_split && plan.num_splits > 1 && plan.num_splits <= 4) {
    const int optin = attn::cached_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(48 * 1024);
    for (int warps = plan.num_splits == 2 ? 2 * kDecodeWarps : 4 * kDecodeWarps; warps >= 2 * kDecodeWarps; warps /= 2) {
      // (16 warps at head_dim 128 would need 263 KB: no GPU has that, and no such kernel exists.)
      if (decode_mma_smem_bytes(head_dim, warps) > optin || (head_dim == 128 && warps > 2 * kDecodeWarps)) continue;
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
  if (plan.tensor_cores && !plan.tma && !skewed_split && plan.warps == kDecodeWarps)  // (its wave model: equal blocks)
    plan_blocks_per_sm(plan, base * plan.num_splits, fit, num_sms, dtype, head_dim, group);
  return plan;
}

// The decode op asks for its plan twice per call (the bindings size the workspace
// first, then launch), and the model asks again for the same shapes in every layer:
// remember the last answer per thread, so the repeats cost a comparison.
//
// sum_seq_lens: the sum of the batch's lengths if the caller knows it on the host (the
// engine does), else -1. It says whether the lengths are about equal (their mean is at
// least 4/5 of max_seq_len) or skewed (the mean under 1/3 of it); for a skewed batch the
// plan also sizes its pieces from the sum, rounded up to 256 tokens (so that a sum that
// grows by a token per sequence per step rarely re-plans). The grid never depends on it
// beyond that. (A CUDA graph keeps the plan it captured: replayed for other lengths it
// stays correct, if slower.)
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

// The sequence's length, clamped to what the grid covers: the block table's capacity,
// which the bindings pass as max_seq_len. A length outside [0, capacity] is a caller's
// bug; clamped, it never sends a read past the block-table row or the workspace.
//   checked_seq_len  the main kernels: clamp, and raise kErrSeqLens if it was outside;
//   clamped_seq_len  the merge kernel: clamp only (the main kernel has already told).
__device__ __forceinline__ int seq_len_cap(const DecodeParams& p) {
  return min(p.max_blocks_per_seq << p.block_size_log2, p.num_splits * p.partition_size);
}
__device__ __forceinline__ int checked_seq_len(const DecodeParams& p, int raw) {
  return attn::checked_seq_len(raw, seq_len_cap(p), p.errors);
}
__device__ __forceinline__ int clamped_seq_len(const DecodeParams& p, int seq) {
  return max(0, min(p.seq_lens[seq], seq_len_cap(p)));
}

// The end of both kernels: each of the block's warps left its own online-softmax state
// for every query head in shared memory (sm_acc [warps][rows][D], sm_m and sm_l
// [warps][rows]); merge them (the two-state merge above, four at once) and write
// either the final output (the sequence fits into one partition) or this partition's
// unnormalised (m, l, acc) for the merge kernel.
template <typename T, int D, int WARPS = kDecodeWarps>
__device__ __forceinline__ void combine_warps_and_store(const DecodeParams& p, const float* sm_acc,
                                                        const float* sm_m, const float* sm_l, int rows, int nh,
                                                        int head0, int seq, int split, bool single) {
  for (int idx = threadIdx.x; idx < nh * D; idx += WARPS * 32) {
    const int g = idx / D;
    const int d = idx - g * D;
    float mx = kEmptyMax;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_m[w * rows + g]);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float f = fast_exp2(sm_m[w * rows + g] - mx);
      L += sm_l[w * rows + g] * f;
      A += sm_acc[(w * rows + g) * D + d] * f;
    }
    const int h = head0 + g;
    if (single) {
      // L == 0 only for a zero-length sequence, whose output is defined as 0.
      T* out = static_cast<T*>(p.out) + (int64_t(seq) * p.num_heads + h) * D;
      out[d] = from_float<T>(L > 0.f ? A / L : 0.f);
    } else {
      const int64_t wi = (int64_t(seq) * p.num_heads + h) * p.num_splits + split;
      p.ws_acc[wi * D + d] = A;
      if (d == 0) {
        p.ws_m[wi] = mx;
        p.ws_l[wi] = L;
      }
    }
  }
}

template <typename T, int D, int GMAX>
__global__ void __launch_bounds__(kDecodeThreads) paged_attention_decode_kernel(const DecodeParams p) {
  constexpr int VEC = Vec16<T>::N;  // elements per 16-byte load
  constexpr int TPR = D / VEC;      // threads per key row
  constexpr int RPW = 32 / TPR;     // key rows a warp reads at once
  constexpr int U = GMAX >= 8 ? 2 : 4;  // row-sets per step (more loads in flight; fewer for big groups: registers)
  constexpr int STEP = RPW * U;     // tokens per warp per step
  static_assert(D % VEC == 0 && 32 % TPR == 0, "head_dim must split evenly over a warp");

  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int kvh = blockIdx.x / p.head_chunks;
  const int chunk = blockIdx.x - kvh * p.head_chunks;
  const int head0 = kvh * p.group + chunk * GMAX;  // first query head of this block
  const int nh = min(GMAX, p.group - chunk * GMAX);  // query heads of this block (<= GMAX)

  attn::allow_dependent_launch();  // the merge kernel may start its launch now (it waits for our results)
  const int seq_len = checked_seq_len(p, p.seq_lens[seq]);
  const int p0 = split * p.partition_size;
  // A partition past the end of a shorter sequence has nothing to do. Split 0
  // always runs so that a zero-length sequence still gets its (zero) output.
  if (split > 0 && p0 >= seq_len) return;
  const int p1 = min(p0 + p.partition_size, seq_len);
  const bool single = seq_len <= p.partition_size;  // one partition: write the final output here

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int r = lane / TPR;  // which row of the warp's row-set this thread reads
  const int c = lane % TPR;  // which 16-byte slice of the row

  // This thread's slice of each query head, pre-multiplied by scale * log2(e).
  float q[GMAX][VEC];
  {
    const T* qp = static_cast<const T*>(p.query) + int64_t(seq) * p.q_row_stride + int64_t(head0) * D + c * VEC;
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g < nh) {
        Vec16<T>::to_float(ld_global_16(qp + g * D), q[g]);
#pragma unroll
        for (int v = 0; v < VEC; ++v) q[g][v] *= p.scale_log2;
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) q[g][v] = 0.f;
      }
    }
  }

  float m[GMAX], l[GMAX], acc[GMAX][VEC];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = kEmptyMax;
    l[g] = 0.f;
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[g][v] = 0.f;
  }

  const int32_t* btab = p.block_tables + int64_t(seq) * p.max_blocks_per_seq;
  const int bs_mask = (1 << p.block_size_log2) - 1;
  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);

  // Warps take turns over steps of STEP consecutive tokens. The loop bound depends
  // only on the warp, so all 32 lanes stay together for the shuffles inside.
  for (int base = p0 + warp * STEP; base < p1; base += kDecodeWarps * STEP) {
    uint4 kr[U], vr[U];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = base + u * RPW + r;
      valid[u] = t < p1;
      if (valid[u]) {
        const int64_t blk = attn::checked_block(btab[t >> p.block_size_log2], p.num_blocks, p.errors);
        const int64_t off = ((((blk * p.num_kv_heads + kvh) << p.block_size_log2) + (t & bs_mask)) * D) + c * VEC;
        kr[u] = ld_global_16(kc + off);
        vr[u] = ld_global_16(vc + off);  // issued now so its latency hides behind the q.k math
      } else {
        kr[u] = make_uint4(0, 0, 0, 0);
        vr[u] = make_uint4(0, 0, 0, 0);
      }
    }

    // Scores: partial dot products over this thread's slice, then summed over the
    // TPR threads of the row (xor-shuffles stay inside aligned groups of TPR lanes).
    float s[GMAX][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[VEC];
      Vec16<T>::to_float(kr[u], kf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int v = 0; v < VEC; ++v) dot = fmaf(q[g][v], kf[v], dot);
        s[g][u] = dot;
      }
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g)
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int o = TPR / 2; o > 0; o >>= 1) s[g][u] += __shfl_xor_sync(0xffffffffu, s[g][u], o);

    // Online softmax, one rescale per step (not per token): new max over the U
    // tokens, rescale the old state once, then add the U new terms.
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (valid[u]) mx = fmaxf(mx, s[g][u]);
      const float alpha = fast_exp2(m[g] - mx);
      m[g] = mx;
      l[g] *= alpha;
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[g][v] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[g][u] = valid[u] ? fast_exp2(s[g][u] - mx) : 0.f;  // s now holds the weight p
        l[g] += s[g][u];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[VEC];
      Vec16<T>::to_float(vr[u], vf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[g][v] = fmaf(s[g][u], vf[v], acc[g][v]);
    }
  }

  // Merge the RPW row states of the warp: lanes c, c+TPR, c+2*TPR, ... hold the
  // same slice of head_dim for different tokens.
#pragma unroll
  for (int o = TPR; o < 32; o <<= 1) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], o);
      const float lo = __shfl_xor_sync(0xffffffffu, l[g], o);
      const float mn = fmaxf(m[g], mo);
      const float a = fast_exp2(m[g] - mn);
      const float b = fast_exp2(mo - mn);
      l[g] = l[g] * a + lo * b;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[g][v], o);
        acc[g][v] = acc[g][v] * a + ao * b;
      }
      m[g] = mn;
    }
  }

  // Merge across warps through shared memory.
  __shared__ float sm_acc[kDecodeWarps][GMAX][D];
  __shared__ float sm_m[kDecodeWarps][GMAX];
  __shared__ float sm_l[kDecodeWarps][GMAX];
  if (r == 0) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g)
#pragma unroll
      for (int v = 0; v < VEC; ++v) sm_acc[warp][g][c * VEC + v] = acc[g][v];
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = l[g];
    }
  }
  __syncthreads();
  combine_warps_and_store<T, D>(p, &sm_acc[0][0][0], &sm_m[0][0], &sm_l[0][0], GMAX, nh, head0, seq, split, single);
}

// ============================ tensor-core kernel ===============================
// Same grid, same partitions, same online softmax and the same end as the kernel
// above; only the inner loop changes. (One exception, HPW, "one kv head per warp":
// grid.x is ceil(num_kv_heads / 4), each warp takes a kv head whole and stores its own
// result, and there is no merge of warps at the end.) For one block's query heads (at most 16: the M
// of the mma) and one tile of 16 tokens:
//
//     S = Q K^T      [16 heads x 16 tokens]   head_dim/16 k-steps x 2 n-tiles of mma
//     online softmax on S, in registers        (a head's row lives in 4 threads, a "quad")
//     O += P V       [16 heads x head_dim]    one k-step (the 16 tokens) x head_dim/8 n-tiles
//
// With group 4 (Llama 3.2 1B) only 4 of the 16 rows are real heads: the tensor cores
// do 4x the needed math, which costs nothing here, because they are idle anyway.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), two 16-bit values per register:
//   A 16x16: a0 = (row g, cols 2t,2t+1)  a1 = (row g+8, cols 2t,2t+1)  a2, a3: the same, cols +8
//   B 16x8:  b0 = (rows 2t,2t+1, col g)  b1 = (rows 2t+8,2t+9, col g)
//   C 16x8:  c0,c1 = (row g, cols 2t,2t+1)  c2,c3 = (row g+8, cols 2t,2t+1)   (float32)
// Q is the A operand of Q K^T and stays in registers for the whole loop. K^T is the B
// operand: b0 = K[token g][dims 2t,2t+1] - two neighbours of one key row, which is how
// K lies in memory, so a plain ldmatrix delivers it. P V needs b0 = V[tokens 2t,2t+1]
// [dim g]: two DIFFERENT tokens, so V is read with ldmatrix.trans (transposed on the
// way from shared memory). And P, the A operand of P V, is already in the registers
// where Q K^T left S: c0,c1 of the first n-tile are a0, those of the second are a2.
//
// Loading: each warp streams ITS OWN tiles (tiles w, w+W, w+2W, ... of the partition,
// W = WARPS: 4, or 8 or 16 in the wide blocks that replace a few splits; see plan_decode;
// with one kv head per warp, HPW, every tile of the warp's own kv head)
// through a private ring of kStages shared-memory stages with cp.async, which copies
// global -> shared without passing through registers and without blocking the thread.
// While the warp multiplies tile i, tile i+1 is on its way. The warps never
// wait for each other until the end (__syncwarp only). The block-table entries of 32
// tiles are read at once, one per lane, so table lookups do not stall the copies.
//
// A tile starts at a multiple of 16 tokens and blocks hold >= 8 tokens, so rows 0-7 of
// a tile lie in one cache block and rows 8-15 in one (maybe the same) block: two
// block-table entries per tile.
//
// Two ways to copy a tile (template parameter TMA):
//   * cp.async (any sm_80+ GPU): the warp's 32 lanes issue 16-byte copies, 8 per lane
//     per tile at head_dim 64.
//   * TMA (sm_90+, see tma.cuh): lane 0 hands the copy engine one box per cache block
//     and matrix (at head_dim 64 and blocks of >= 16 tokens: one for K, one for V) and
//     the warp waits on the stage's mbarrier. The rows are dense and swizzled. This takes
//     the copies off the SM and halves the L2 requests, and still did not make the
//     kernel faster (measured; see choose_kernel and the course, chapter 11).
// The cache, seen by the copy engine, is one 2-D array of rows: row
// (block * num_kv_heads + kv_head) * block_size + slot holds one token's head_dim values.
//
// Both loaders lay a tile out the same way in shared memory: dense 128-byte rows (64
// columns; head_dim 128 is two such halves), with 16-byte chunk c of row r stored at
// chunk c ^ (r % 8), the "128-byte swizzle" of tma.cuh. Why not simply pad each row by
// 16 bytes, which also keeps ldmatrix free of bank conflicts? We did, and Nsight Compute
// showed the SMs pulling 1.5x the cache's bytes out of L2 (100.8 M sectors for 67.1 M):
// a padded row of 144 bytes puts every other row's 32-byte sectors across a 32-byte
// boundary of shared memory, and cp.async then fetches each such sector twice. With the
// swizzle a 32-byte sector stays one aligned 32-byte slot (chunks 2k and 2k+1 land next
// to each other, as XOR with r % 8 keeps them a pair), and the traffic is 1.0x.
//
// Registers: at head_dim 64 the 4-warp kernel needs at most 96 per thread for 5 blocks to
// fit on an SM (65,536 registers, allocated 8 per thread at a time); the plan counts on 5
// (plan_blocks_per_sm, and its test). The compiler chose 96 on its own until two fields
// were added to DecodeParams, then 98, and only 4 blocks fit. The second __launch_bounds__
// argument (blocks per SM; 0: no demand) asks for 5, and ptxas meets it without spilling.
// HI: some block has more than 8 query heads (rows 8..15 in use). HPW: one kv head per
// warp (see "One kv head per warp" above; cp.async, 4 warps).
template <typename T, int D, bool HI, bool TMA, int WARPS, bool HPW = false>
__global__ void __launch_bounds__(WARPS * 32, D == 64 && WARPS == kDecodeWarps ? 5 : 0)
    paged_attention_decode_mma_kernel(const DecodeParams p, const __grid_constant__ CUtensorMap kmap,
                                      const __grid_constant__ CUtensorMap vmap) {
  constexpr int TILE = kTile * D;       // elements of one staged K (or V) tile: dense rows
  constexpr int HALF = kTile * 64;      // elements of one 64-column half of a tile (128-byte rows)
  constexpr int KSTEPS = D / 16;        // k-steps of Q K^T (over head_dim)
  constexpr int NT_O = D / 8;           // 8-column tiles of O
  constexpr int CHUNKS = D / 8;         // 16-byte chunks per row
  constexpr int RSTEP = 32 / CHUNKS;    // rows one warp-wide pass of 16-byte copies covers
  constexpr int PASSES = kTile / RSTEP; // passes per tile (the first half: rows 0-7)
  static_assert(KSTEPS % 2 == 0 && NT_O % 2 == 0 && PASSES % 2 == 0, "head_dim must be 64 or 128");
  static_assert(!HPW || (!TMA && WARPS == kDecodeWarps), "one kv head per warp: the 4-warp cp.async kernel");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  // The swizzle repeats every 1024 bytes: the tiles start on a 1024-byte boundary.
  unsigned char* const tiles =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* const ring = reinterpret_cast<T*>(tiles) + warp * (kStages * 2 * TILE);  // this warp's stages
  // TMA: one mbarrier per stage of this warp, after all the tiles.
  uint64_t* const bars = reinterpret_cast<uint64_t*>(tiles + WARPS * kStages * 2 * TILE * sizeof(T)) +
                         warp * kStages;
  // Element offset of (row, col) in a staged tile; col is a multiple of 8 (one 16-byte
  // chunk): 64-column halves of 16 rows x 128 bytes, each swizzled (tma.cuh).
  auto at = [](int row, int col) -> int {
    return (col >> 6) * HALF + tma::swizzled_offset(row, (col & 63) >> 3) / int(sizeof(T));
  };

  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  // The usual block: kv head blockIdx.x / head_chunks (and, past 16 query heads, a chunk of
  // its group), its warps sharing the tiles. HPW: kv head 4 * blockIdx.x + warp, a warp's own.
  const int kvh = HPW ? blockIdx.x * WARPS + warp : blockIdx.x / p.head_chunks;
  const int chunk = HPW ? 0 : blockIdx.x - kvh * p.head_chunks;
  const int head0 = kvh * p.group + chunk * kMmaRows;
  const int nh = min(kMmaRows, p.group - chunk * kMmaRows);
  attn::allow_dependent_launch();  // the merge kernel may start its launch now (it waits for our results)
  // HPW: a warp past the last kv head has nothing to do (the HPW path has no block-wide barrier).
  if (HPW && kvh >= p.num_kv_heads) return;
  // This warp's tiles of the partition: tw, tw + TS, tw + 2 TS, ... (HPW: all of them).
  const int tw = HPW ? 0 : warp;
  constexpr int TS = HPW ? 1 : WARPS;

  // ---- prologue: three independent reads, issued together ----
  // The sequence's length, the query and the block-table entries do not depend on
  // each other, so they are requested at once and their latencies (~1 us each from
  // DRAM) overlap; only the k/v copies must wait for the table.
  const int raw_seq_len = p.seq_lens[seq];

  // Q as the A operand (rows past the block's heads are zero), loaded once.
  uint32_t qa[KSTEPS][4];
  {
    const T* qp = static_cast<const T*>(p.query) + int64_t(seq) * p.q_row_stride + int64_t(head0) * D + 2 * t;
    const bool lo_ok = g < nh;
    const bool hi_ok = HI && g + 8 < nh;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      qa[ks][0] = lo_ok ? attn::ld_global_4(qp + g * D + ks * 16) : 0u;
      qa[ks][1] = hi_ok ? attn::ld_global_4(qp + (g + 8) * D + ks * 16) : 0u;
      qa[ks][2] = lo_ok ? attn::ld_global_4(qp + g * D + ks * 16 + 8) : 0u;
      qa[ks][3] = hi_ok ? attn::ld_global_4(qp + (g + 8) * D + ks * 16 + 8) : 0u;
    }
  }

  // Block-table entries, 32 tiles at a time: lane j holds the entries of this warp's
  // tile i0 + j (rows 0-7 and rows 8-15), and issue() takes them with a shuffle.
  // Bounded by the table's width and the partition, not by the sequence's length
  // (not known yet): entries past the end are read but never followed.
  const int32_t* btab = p.block_tables + int64_t(seq) * p.max_blocks_per_seq;
  const int l2 = p.block_size_log2;
  const int bs_mask = (1 << l2) - 1;
  const int p0 = split * p.partition_size;
  const int pcap = min(p0 + p.partition_size, p.max_blocks_per_seq << l2);
  int ent_lo, ent_hi;
  auto fetch_entries = [&](int i0) {
    const int tok0 = p0 + (tw + TS * (i0 + lane)) * kTile;
    ent_lo = tok0 < pcap ? __ldg(btab + (tok0 >> l2)) : 0;
    ent_hi = tok0 + 8 < pcap ? __ldg(btab + ((tok0 + 8) >> l2)) : 0;
  };
  fetch_entries(0);
  // The entries whose rows hold tokens (below p1) are the ones issue() follows: each must
  // name a block of the cache (attn::checked_block). Entries of rows past the end are
  // never followed, so the padding after a sequence is never judged. Checked once per
  // 32 tiles, as the entries arrive, so the tile loop pays nothing.
  auto check_entries = [&](int i0, int p1) {
    const int tok0 = p0 + (tw + TS * (i0 + lane)) * kTile;
    if (tok0 < p1) ent_lo = attn::checked_block(ent_lo, p.num_blocks, p.errors);
    if (tok0 + 8 < p1) ent_hi = attn::checked_block(ent_hi, p.num_blocks, p.errors);
  };
  if (TMA) {
    if (lane == 0) {
#pragma unroll
      for (int st = 0; st < kStages; ++st) tma::mbarrier_init(&bars[st], 1);  // one arrival: lane 0's
      tma::fence_barrier_init();
    }
    __syncwarp();
  }

  const int seq_len = checked_seq_len(p, raw_seq_len);
  // A partition past the end of a shorter sequence has nothing to do. Split 0
  // always runs so that a zero-length sequence still gets its (zero) output.
  if (split > 0 && p0 >= seq_len) return;
  const int p1 = min(p0 + p.partition_size, seq_len);
  const bool single = seq_len <= p.partition_size;  // one partition: write the final output here
  check_entries(0, p1);

  const int n_tiles = (max(p1 - p0, 0) + kTile - 1) / kTile;
  const int my_tiles = n_tiles > tw ? (n_tiles - tw + TS - 1) / TS : 0;
  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);
  const int c = lane % CHUNKS;  // the 16-byte chunk of a row this lane copies
  const int r0 = lane / CHUNKS; // its first row; then every RSTEP rows

  // Start copying this warp's tile i into its stage. Rows past the partition's end read
  // nothing and are filled with zeros (so no NaN from unused cache memory enters the mma).
  // Why only one tile ahead (kStages = 2)? With 4 blocks of 4 warps per SM that is still
  // 64 KB in flight per SM, enough to cover the DRAM latency, and measured on an H200
  // the deeper ring (2 tiles ahead, 128 KB per SM) was 0-2% SLOWER where the cache
  // streams (batch 256 x 4096: 485 against 477 us): more requests queue in the memory
  // system for the same bandwidth.
  auto issue = [&](int i) {
    if (i < my_tiles) {  // (warp-uniform)
      if (i > 0 && (i & 31) == 0) {
        fetch_entries(i);
        check_entries(i, p1);
      }
      const int e_lo = __shfl_sync(0xffffffffu, ent_lo, i & 31);
      const int e_hi = __shfl_sync(0xffffffffu, ent_hi, i & 31);
      const int tok0 = p0 + (tw + TS * i) * kTile;
      T* sk = ring + (i % kStages) * 2 * TILE;
      T* sv = sk + TILE;
      if constexpr (TMA) {
        // Boxes of R = min(16, block_size) rows: one per cache block the tile touches
        // (two for 8-token blocks), times two 64-column halves at head_dim 128. A box
        // whose first row is past the end is not fetched (its entry may be garbage);
        // a box that starts before the end brings whole rows, and the rows past the
        // end are taken care of after the wait.
        if (lane == 0) {
          const int R = min(kTile, 1 << l2);
          const int boxes = min(kTile / R, (p1 - tok0 + R - 1) / R);
          tma::mbarrier_arrive_expect_tx(&bars[i % kStages], uint32_t(boxes * R * D * 2 * int(sizeof(T))));
#pragma unroll
          for (int b = 0; b < kTile / 8; ++b) {  // at most two boxes (8-token blocks)
            if (b >= boxes) break;
            const int tok = tok0 + b * R;
            const int e = b == 0 ? e_lo : e_hi;
            const int y = ((e * p.num_kv_heads + kvh) << l2) + (tok & bs_mask);
#pragma unroll
            for (int h = 0; h < D / 64; ++h) {
              tma::load_2d(sk + h * HALF + b * R * 64, &kmap, h * 64, y, &bars[i % kStages]);
              tma::load_2d(sv + h * HALF + b * R * 64, &vmap, h * 64, y, &bars[i % kStages]);
            }
          }
        }
      } else {
#pragma unroll
        for (int k = 0; k < PASSES; ++k) {
          const int row = r0 + k * RSTEP;
          const int tok = tok0 + row;
          const bool ok = tok < p1;
          const int64_t blk = ok ? (k < PASSES / 2 ? e_lo : e_hi) : 0;  // never follow an entry past the end
          const int64_t off = ((((blk * p.num_kv_heads + kvh) << l2) + (tok & bs_mask)) * D) + c * 8;
          // No .L2::256B prefetch hint: it made every other 128-byte request an L2 hit on a
          // line the hint had already fetched, and those extra lookups, not DRAM, held the
          // kernel back (ncu, batch 256 x 4096: 135 M L2 sector lookups for 67 M sectors
          // read; without the hint 103 M, as cuDNN's 102 M; 518 -> 493 us on an H200).
          attn::cp_async_16(sk + at(row, c * 8), kc + off, ok ? 16 : 0);
          attn::cp_async_16(sv + at(row, c * 8), vc + off, ok ? 16 : 0);
        }
      }
    }
    if (!TMA) attn::cp_async_commit();  // an empty group past the end keeps the group count uniform
  };

  float o[NT_O][4];
#pragma unroll
  for (int j = 0; j < NT_O; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_lo = kEmptyMax, m_hi = kEmptyMax;  // running max of rows g and g+8 (log2 units)
  float l_lo = 0.f, l_hi = 0.f;              // this thread's share of the running sums

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);

  for (int i = 0; i < my_tiles; ++i) {
    __syncwarp();  // every lane is done reading the stage that the next copy overwrites
    issue(i + kStages - 1);
    const int tok0 = p0 + (tw + TS * i) * kTile;
    const T* sk = ring + (i % kStages) * 2 * TILE;
    T* const sv = ring + (i % kStages) * 2 * TILE + TILE;
    if (TMA) {
      tma::mbarrier_wait_parity(&bars[i % kStages], (i / kStages) & 1);  // tile i has landed
      // The last tile of a partition may hold rows past its end: cache rows of the same
      // block (K: masked to -inf below; V: anything, even NaN, and 0 * NaN = NaN in the
      // mma) or, if a box was skipped, whatever the stage held before. Zero those V rows.
      const int valid = p1 - tok0;
      if (valid < kTile) {
        for (int idx = lane; idx < (kTile - valid) * CHUNKS; idx += 32) {
          const int row = valid + idx / CHUNKS;
          *reinterpret_cast<uint4*>(sv + at(row, (idx % CHUNKS) * 8)) = make_uint4(0, 0, 0, 0);
        }
      }
    } else {
      attn::cp_async_wait<kStages - 1>();  // tile i has landed (for this lane's copies)
    }
    __syncwarp();  // ... and for every lane's copies (and the zeroing)

    // ---- S = Q K^T: 2 n-tiles of 8 tokens; one ldmatrix.x4 feeds two k-steps ----
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int kk = 0; kk < KSTEPS / 2; ++kk) {
        uint32_t b[4];  // matrices: cols +0, +8 (k-step 2kk), +16, +24 (k-step 2kk+1)
        attn::ldmatrix_x4(b, sk + at(nt * 8 + (lane & 7), kk * 32 + (lane >> 3) * 8));
        attn::mma_16816<T>(s[nt], qa[2 * kk], b[0], b[1]);
        attn::mma_16816<T>(s[nt], qa[2 * kk + 1], b[2], b[3]);
      }
    }
    // Scale into log2 units; tokens past the partition's end get -inf (weight 0).
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] *= p.scale_log2;
        if (tok0 + nt * 8 + 2 * t + (e & 1) >= p1) s[nt][e] = -INFINITY;
      }

    // ---- online softmax, rows g (c0, c1) and g+8 (c2, c3) ----
    // The tile's row max: 4 values here, then over the quad (lanes 4g..4g+3).
    float mx = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mn_lo = fmaxf(m_lo, mx);
    const float a_lo = fast_exp2(m_lo - mn_lo);
    m_lo = mn_lo;
    float a_hi = 1.f;
    if (HI) {
      float mh = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
      mh = fmaxf(mh, __shfl_xor_sync(0xffffffffu, mh, 1));
      mh = fmaxf(mh, __shfl_xor_sync(0xffffffffu, mh, 2));
      const float mn_hi = fmaxf(m_hi, mh);
      a_hi = fast_exp2(m_hi - mn_hi);
      m_hi = mn_hi;
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      s[nt][0] = fast_exp2(s[nt][0] - m_lo);  // s now holds the weight p
      s[nt][1] = fast_exp2(s[nt][1] - m_lo);
      if (HI) {
        s[nt][2] = fast_exp2(s[nt][2] - m_hi);
        s[nt][3] = fast_exp2(s[nt][3] - m_hi);
      }
    }
    // l: each thread sums only its own columns; the quad adds them up once at the end.
    l_lo = l_lo * a_lo + (s[0][0] + s[0][1]) + (s[1][0] + s[1][1]);
    if (HI) l_hi = l_hi * a_hi + (s[0][2] + s[0][3]) + (s[1][2] + s[1][3]);
#pragma unroll
    for (int j = 0; j < NT_O; ++j) {
      o[j][0] *= a_lo;
      o[j][1] *= a_lo;
      if (HI) {
        o[j][2] *= a_hi;
        o[j][3] *= a_hi;
      }
    }

    // ---- O += P V: P (16-bit) straight from S's registers; V^T via ldmatrix.trans ----
    const uint32_t pa[4] = {attn::pack2<T>(s[0][0], s[0][1]), HI ? attn::pack2<T>(s[0][2], s[0][3]) : 0u,
                            attn::pack2<T>(s[1][0], s[1][1]), HI ? attn::pack2<T>(s[1][2], s[1][3]) : 0u};
#pragma unroll
    for (int j = 0; j < NT_O / 2; ++j) {
      uint32_t b[4];  // matrices: tokens 0-7 / 8-15 of dims 16j..16j+7, then of dims 16j+8..16j+15
      const int mtx = lane >> 3;
      attn::ldmatrix_x4_trans(b, sv + at((mtx & 1) * 8 + (lane & 7), j * 16 + (mtx >> 1) * 8));
      attn::mma_16816<T>(o[2 * j], pa, b[0], b[1]);
      attn::mma_16816<T>(o[2 * j + 1], pa, b[2], b[3]);
    }
  }
  if (!TMA) attn::cp_async_wait<0>();  // (only empty groups are left; nothing may be in flight at exit)

  // ---- hand the warp's state to the shared end (combine_warps_and_store) ----
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  if (HI) {
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
  }
  if constexpr (HPW) {
    // The warp holds its kv head's whole state for this partition: store it directly.
    // Thread (g, t) holds rows g and g + 8, columns 8j + 2t and 8j + 2t + 1.
#pragma unroll
    for (int half = 0; half < (HI ? 2 : 1); ++half) {
      const int row = g + 8 * half;
      if (row >= nh) continue;
      const int h = head0 + row;
      const float m_row = half ? m_hi : m_lo;
      const float l_row = half ? l_hi : l_lo;
      if (single) {
        const float inv = l_row > 0.f ? 1.f / l_row : 0.f;  // l == 0: a zero-length sequence, output 0
        T* out = static_cast<T*>(p.out) + (int64_t(seq) * p.num_heads + h) * D;
#pragma unroll
        for (int j = 0; j < NT_O; ++j)
          *reinterpret_cast<uint32_t*>(out + j * 8 + 2 * t) =
              attn::pack2<T>(o[j][2 * half] * inv, o[j][2 * half + 1] * inv);
      } else {
        const int64_t wi = (int64_t(seq) * p.num_heads + h) * p.num_splits + split;
#pragma unroll
        for (int j = 0; j < NT_O; ++j)
          *reinterpret_cast<float2*>(p.ws_acc + wi * D + j * 8 + 2 * t) = make_float2(o[j][2 * half], o[j][2 * half + 1]);
        if (t == 0) {
          p.ws_m[wi] = m_row;
          p.ws_l[wi] = l_row;
        }
      }
    }
    return;
  }
  __syncthreads();  // every warp is done with its stages: the shared memory is reused below
  static_assert(WARPS * kMmaRows * (D + 2) * 4 <= decode_mma_smem_bytes(D, WARPS), "the merge must fit the stages");
  float* const sm_acc = reinterpret_cast<float*>(smem_raw);  // [warps][16][D]
  float* const sm_m = sm_acc + WARPS * kMmaRows * D;  // [warps][16]
  float* const sm_l = sm_m + WARPS * kMmaRows;        // [warps][16]
  float* const mine = sm_acc + warp * kMmaRows * D;
#pragma unroll
  for (int j = 0; j < NT_O; ++j) {
    *reinterpret_cast<float2*>(mine + g * D + j * 8 + 2 * t) = make_float2(o[j][0], o[j][1]);
    if (HI) *reinterpret_cast<float2*>(mine + (g + 8) * D + j * 8 + 2 * t) = make_float2(o[j][2], o[j][3]);
  }
  if (t == 0) {
    sm_m[warp * kMmaRows + g] = m_lo;
    sm_l[warp * kMmaRows + g] = l_lo;
    if (HI) {
      sm_m[warp * kMmaRows + g + 8] = m_hi;
      sm_l[warp * kMmaRows + g + 8] = l_hi;
    }
  }
  __syncthreads();
  combine_warps_and_store<T, D, WARPS>(p, sm_acc, sm_m, sm_l, kMmaRows, nh, head0, seq, split, single);
}

// Flash-decoding merge: one block per (head, sequence) combines the partitions'
// (m, l, acc) with weights 2^(m_i - M), M = max_i m_i, and divides by the total l.
template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads) paged_attention_decode_reduce_kernel(const DecodeParams p) {
  const int h = blockIdx.x;
  const int seq = blockIdx.y;
  const int seq_len = clamped_seq_len(p, seq);
  const int n_parts = (seq_len + p.partition_size - 1) / p.partition_size;
  if (n_parts <= 1) return;  // the main kernel already wrote this output
  // Launched early (programmatic dependent launch, see launch_reduce): from here on we
  // read what the main kernel wrote, so wait until it has finished.
  attn::wait_for_prerequisite_grids();

  // Thread (j, d) merges partitions j, j+PAR, j+2*PAR, ... for element d, four at a
  // time: their (m, l, acc[d]) are requested together so the four reads overlap, then
  // merged into a running (M, L, O) exactly like the online softmax. The PAR threads of
  // each d then merge their states through shared memory. (m and l are re-read by
  // every d: they are a few bytes in L2; reading them separately first would cost a
  // second round trip.)
  constexpr int PAR = kDecodeThreads / D;
  const int64_t wi0 = (int64_t(seq) * p.num_heads + h) * p.num_splits;
  const int d = threadIdx.x % D;
  float M = kEmptyMax, L = 0.f, O = 0.f;
  for (int i0 = threadIdx.x / D; i0 < n_parts; i0 += 4 * PAR) {
    float mi[4], li[4], ai[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = i0 + u * PAR;
      const bool ok = i < n_parts;
      mi[u] = ok ? p.ws_m[wi0 + i] : kEmptyMax;
      li[u] = ok ? p.ws_l[wi0 + i] : 0.f;
      ai[u] = ok ? p.ws_acc[(wi0 + i) * D + d] : 0.f;
    }
    float mn = M;
#pragma unroll
    for (int u = 0; u < 4; ++u) mn = fmaxf(mn, mi[u]);
    const float a = fast_exp2(M - mn);
    L *= a;
    O *= a;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float f = fast_exp2(mi[u] - mn);
      L = fmaf(f, li[u], L);
      O = fmaf(f, ai[u], O);
    }
    M = mn;
  }
  __shared__ float sm[3][kDecodeThreads];
  sm[0][threadIdx.x] = M;
  sm[1][threadIdx.x] = L;
  sm[2][threadIdx.x] = O;
  __syncthreads();
  if (threadIdx.x < D) {
    float mx = kEmptyMax;
#pragma unroll
    for (int j = 0; j < PAR; ++j) mx = fmaxf(mx, sm[0][j * D + threadIdx.x]);
    float LL = 0.f, OO = 0.f;
#pragma unroll
    for (int j = 0; j < PAR; ++j) {
      const float f = fast_exp2(sm[0][j * D + threadIdx.x] - mx);
      LL = fmaf(f, sm[1][j * D + threadIdx.x], LL);
      OO = fmaf(f, sm[2][j * D + threadIdx.x], OO);
    }
    // LL >= 1: the partition holding the overall max contributes l >= 1.
    T* out = static_cast<T*>(p.out) + (int64_t(seq) * p.num_heads + h) * D;
    out[threadIdx.x] = from_float<T>(OO / LL);
  }
}

template <typename T, int D, int GMAX>
void launch_decode_cuda_cores(const DecodeParams& prm, int num_seqs, cudaStream_t stream) {
  const dim3 grid(prm.num_kv_heads * prm.head_chunks, num_seqs, prm.num_splits);
  paged_attention_decode_kernel<T, D, GMAX><<<grid, kDecodeThreads, 0, stream>>>(prm);
  CUDA_CHECK(cudaGetLastError());
}

// The copy engine's view of the two caches (TMA kernel only; zeros otherwise).
struct CacheMaps {
  CUtensorMap k{}, v{};
};

template <typename T, int D, bool HI, bool TMA, int WARPS = kDecodeWarps, bool HPW = false>
void launch_decode_mma(const DecodeParams& prm, int smem, const CacheMaps& maps, int num_seqs, cudaStream_t stream) {
  attn::prepare_kernel(reinterpret_cast<const void*>(paged_attention_decode_mma_kernel<T, D, HI, TMA, WARPS, HPW>),
                       WARPS * 32, smem);
  const int blocks_x = HPW ? (prm.num_kv_heads + WARPS - 1) / WARPS : prm.num_kv_heads * prm.head_chunks;
  const dim3 grid(blocks_x, num_seqs, prm.num_splits);
  paged_attention_decode_mma_kernel<T, D, HI, TMA, WARPS, HPW><<<grid, WARPS * 32, smem, stream>>>(prm, maps.k, maps.v);
  CUDA_CHECK(cudaGetLastError());
}

// cp.async kernel with the plan's warps per block (16 only fits shared memory at head_dim 64).
template <typename T, int D, bool HI>
void launch_decode_mma_cp_async(const DecodeParams& prm, const DecodePlan& plan, const CacheMaps& maps,
                                int num_seqs, cudaStream_t stream) {
  if (plan.head_per_warp) return launch_decode_mma<T, D, HI, false, 4, true>(prm, plan.smem_bytes, maps, num_seqs, stream);
  if constexpr (D == 64) {
    if (plan.warps == 16) return launch_decode_mma<T, D, HI, false, 16>(prm, plan.smem_bytes, maps, num_seqs, stream);
  }
  if (plan.warps == 8) return launch_decode_mma<T, D, HI, false, 8>(prm, plan.smem_bytes, maps, num_seqs, stream);
  launch_decode_mma<T, D, HI, false, 4>(prm, plan.smem_bytes, maps, num_seqs, stream);
}

template <typename T, int D>
void launch_reduce(const DecodeParams& prm, int num_seqs, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(prm.num_heads, num_seqs);
  cfg.blockDim = dim3(kDecodeThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = attn::device_cc_major() >= 9 ? 1 : 0;
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, paged_attention_decode_reduce_kernel<T, D>, prm));
}

// CUDA-core kernel, instantiated per dtype, head_dim and group size.
template <typename T, int D>
void dispatch_cuda_cores(const DecodeParams& prm, int gmax, int num_seqs, cudaStream_t stream) {
  switch (gmax) {
    case 1: launch_decode_cuda_cores<T, D, 1>(prm, num_seqs, stream); break;
    case 2: launch_decode_cuda_cores<T, D, 2>(prm, num_seqs, stream); break;
    case 4: launch_decode_cuda_cores<T, D, 4>(prm, num_seqs, stream); break;
    default: launch_decode_cuda_cores<T, D, 8>(prm, num_seqs, stream); break;
  }
  if (prm.num_splits > 1) launch_reduce<T, D>(prm, num_seqs, stream);
}

// Tensor-core kernel (bf16/fp16); HI when a block holds more than 8 query heads.
template <typename T, int D>
void dispatch_mma(const DecodeParams& prm, const DecodePlan& plan, const CacheMaps& maps, int num_seqs,
                  cudaStream_t stream) {
  const bool hi = prm.group > 8;
  if (plan.tma) {
    hi ? launch_decode_mma<T, D, true, true>(prm, plan.smem_bytes, maps, num_seqs, stream)
       : launch_decode_mma<T, D, false, true>(prm, plan.smem_bytes, maps, num_seqs, stream);
  } else {
    hi ? launch_decode_mma_cp_async<T, D, true>(prm, plan, maps, num_seqs, stream)
       : launch_decode_mma_cp_async<T, D, false>(prm, plan, maps, num_seqs, stream);
  }
  if (prm.num_splits > 1) launch_reduce<T, D>(prm, num_seqs, stream);
}

template <typename T, int D>
void dispatch_kernel(const DecodeParams& prm, const DecodePlan& plan, const CacheMaps& maps, int num_seqs,
                     cudaStream_t stream) {
  if (plan.tensor_cores) {
    dispatch_mma<T, D>(prm, plan, maps, num_seqs, stream);
  } else {
    dispatch_cuda_cores<T, D>(prm, plan.gmax, num_seqs, stream);
  }
}

template <int D>
void dispatch_dtype(const DecodeParams& prm, const DecodePlan& plan, const CacheMaps& maps, int num_seqs,
                    DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return dispatch_cuda_cores<float, D>(prm, plan.gmax, num_seqs, stream);
    case DType::kFloat16: return dispatch_kernel<__half, D>(prm, plan, maps, num_seqs, stream);
    case DType::kBFloat16: return dispatch_kernel<__nv_bfloat16, D>(prm, plan, maps, num_seqs, stream);
  }
}

// The cp.async tensor-core kernel with `warps` warps per block (16 exists at head_dim 64 only),
// or with one kv head per warp.
template <typename T, int D, bool HI>
const void* cp_async_kernel(int warps, bool head_per_warp) {
  if (head_per_warp) return reinterpret_cast<const void*>(paged_attention_decode_mma_kernel<T, D, HI, false, 4, true>);
  if constexpr (D == 64) {
    if (warps == 16) return reinterpret_cast<const void*>(paged_attention_decode_mma_kernel<T, D, HI, false, 16>);
  }
  if (warps == 8) return reinterpret_cast<const void*>(paged_attention_decode_mma_kernel<T, D, HI, false, 8>);
  return reinterpret_cast<const void*>(paged_attention_decode_mma_kernel<T, D, HI, false, kDecodeWarps>);
}

// The kernel a plan launches, as a pointer for the occupancy query.
template <typename T, int D>
const void* planned_kernel(const DecodePlan& plan, int group) {
  const bool hi = group > 8;
  if constexpr (!std::is_same<T, float>::value) {  // no tensor-core kernel for fp32 caches
    if (plan.tensor_cores) {
      if (plan.tma)
        return hi ? reinterpret_cast<const void*>(paged_attention_decode_mma_kernel<T, D, true, true, kDecodeWarps>)
                  : reinterpret_cast<const void*>(paged_attention_decode_mma_kernel<T, D, false, true, kDecodeWarps>);
      return hi ? cp_async_kernel<T, D, true>(plan.warps, plan.head_per_warp)
                : cp_async_kernel<T, D, false>(plan.warps, plan.head_per_warp);
    }
  }
  switch (plan.gmax) {
    case 1: return reinterpret_cast<const void*>(paged_attention_decode_kernel<T, D, 1>);
    case 2: return reinterpret_cast<const void*>(paged_attention_decode_kernel<T, D, 2>);
    case 4: return reinterpret_cast<const void*>(paged_attention_decode_kernel<T, D, 4>);
    default: return reinterpret_cast<const void*>(paged_attention_decode_kernel<T, D, 8>);
  }
}

template <int D>
const void* planned_kernel(const DecodePlan& plan, DType dtype, int group) {
  switch (dtype) {
    case DType::kFloat32: return planned_kernel<float, D>(plan, group);
    case DType::kFloat16: return planned_kernel<__half, D>(plan, group);
    default: return planned_kernel<__nv_bfloat16, D>(plan, group);
  }
}

int resident_blocks_per_sm(const DecodePlan& plan, DType dtype, int head_dim, int group) {
  const void* kernel = head_dim == 128 ? planned_kernel<128>(plan, dtype, group) : planned_kernel<64>(plan, dtype, group);
  return plan.tensor_cores ? attn::prepare_kernel(kernel, plan.warps * 32, plan.smem_bytes)
                           : attn::prepare_kernel(kernel, kDecodeThreads, 0);
}

}  // namespace

DecodePlanInfo paged_attention_decode_plan(int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                                           int max_seq_len, int64_t sum_seq_lens, DType dtype, int impl) {
  const DecodePlan plan = plan_decode(num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len, sum_seq_lens,
                                      attn::num_sms_of_current_device(), dtype, impl);
  const int group = std::max(1, num_heads / std::max(1, num_kv_heads));
  return DecodePlanInfo{plan.tensor_cores, plan.tma, plan.num_splits, plan.partition_size, plan.warps,
                        resident_blocks_per_sm(plan, dtype, head_dim, group), plan.tensor_cores ? plan.smem_bytes : 0,
                        plan.head_per_warp};
}

size_t paged_attention_decode_workspace_size(int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                                             int max_seq_len, int64_t sum_seq_lens, DType dtype, int impl) {
  const DecodePlan plan = plan_decode(num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len, sum_seq_lens,
                                      attn::num_sms_of_current_device(), dtype, impl);
  if (plan.num_splits <= 1) return 0;
  return size_t(num_seqs) * num_heads * plan.num_splits * (head_dim + 2) * sizeof(float);
}

void paged_attention_decode(void* out, const void* query, const void* key_cache, const void* value_cache,
                            const int32_t* block_tables, const int32_t* seq_lens, int num_seqs, int num_heads,
                            int num_kv_heads, int head_dim, int block_size, int max_blocks_per_seq,
                            int max_seq_len, int64_t sum_seq_lens, int64_t num_cache_blocks,
                            int64_t query_row_stride, float scale, void* workspace, DType dtype, int impl,
                            cudaStream_t stream) {
  if (num_seqs == 0) return;
  const DecodePlan plan = plan_decode(num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len, sum_seq_lens,
                                      attn::num_sms_of_current_device(), dtype, impl);
  DecodeParams prm{};
  prm.out = out;
  prm.query = query;
  prm.key_cache = key_cache;
  prm.value_cache = value_cache;
  prm.block_tables = block_tables;
  prm.seq_lens = seq_lens;
  prm.num_heads = num_heads;
  prm.num_kv_heads = num_kv_heads;
  prm.group = num_heads / num_kv_heads;
  prm.head_chunks = plan.head_chunks;
  prm.block_size_log2 = attn::log2_exact(block_size);
  prm.max_blocks_per_seq = max_blocks_per_seq;
  prm.q_row_stride = query_row_stride;
  prm.scale_log2 = scale * kLog2e;
  prm.partition_size = plan.partition_size;
  prm.num_splits = plan.num_splits;
  prm.num_blocks = static_cast<int>(num_cache_blocks);
  prm.errors = kernel_error_flags();
  if (plan.num_splits > 1) {
    if (workspace == nullptr) {
      throw std::runtime_error("paged_attention_decode: workspace is null but " + std::to_string(plan.num_splits) +
                               " context splits need one (use paged_attention_decode_workspace_size)");
    }
    const size_t n = size_t(num_seqs) * num_heads * plan.num_splits;
    prm.ws_acc = static_cast<float*>(workspace);
    prm.ws_m = prm.ws_acc + n * head_dim;
    prm.ws_l = prm.ws_m + n;
  }
  CacheMaps maps;
  if (plan.tma) {
    // Both caches as one 2-D array of token rows (see the kernel); boxes of one cache
    // block's rows, at most the 16 of a tile.
    const uint64_t rows = uint64_t(num_cache_blocks) * num_kv_heads * block_size;
    const uint32_t box_rows = uint32_t(std::min(kTile, block_size));
    maps.k = tma::make_row_tensor_map(key_cache, dtype, rows, head_dim, box_rows);
    maps.v = tma::make_row_tensor_map(value_cache, dtype, rows, head_dim, box_rows);
  }
  switch (head_dim) {
    case 64: return dispatch_dtype<64>(prm, plan, maps, num_seqs, dtype, stream);
    case 128: return dispatch_dtype<128>(prm, plan, maps, num_seqs, dtype, stream);
    default: throw std::runtime_error("paged_attention_decode: head_dim must be 64 or 128");
  }
}

}  // namespace tinyvllm
