// The named (bar.sync) barriers of the Hopper kernels, by what they order. CUTLASS reserves the first
// ids; NamedBarrier adds its count to these.
#pragma once

#include <cutlass/arch/barrier.h>

namespace flash::sm90 {

enum class FwdBarrier : uint32_t {
  OutputReady = 0,       // every consumer has written its O rows to shared memory: the TMA store may read
  OutputFree = 1,        // the previous tile's TMA store has read O's buffer: the consumers may write it
  QueryFree = 2,         // the consumers are done with Q's buffer: the producer may load the next tile's Q
  WarpgroupTurn1 = 3,    // ping-pong: warpgroup 1 may issue its matmuls; WarpgroupTurn1 + w for warpgroup w
  WarpgroupTurnEnd = 6,  // one past the last turn: ping-pong among at most three consumer warpgroups
};
static_assert(cutlass::arch::NamedBarrier::ReservedNamedBarrierCount + uint32_t(FwdBarrier::WarpgroupTurnEnd) <=
                  cutlass::arch::NamedBarrier::HardwareMaxNumNamedBarriers,
              "the forward's barriers outnumber the hardware's 16");

CUTE_DEVICE void barrier_sync(int threads, FwdBarrier id, int offset = 0) {
  cutlass::arch::NamedBarrier::sync(threads, static_cast<uint32_t>(id) + offset);
}
CUTE_DEVICE void barrier_arrive(int threads, FwdBarrier id, int offset = 0) {
  cutlass::arch::NamedBarrier::arrive(threads, static_cast<uint32_t>(id) + offset);
}

// The backward kernels' (bwd_dkdv_kernel.h, bwd_dq_kernel.h).
enum class BwdBarrier : uint32_t {
  GradsReady = 0,  // every consumer has written its gradient rows (dK and dV, or dQ) to shared memory: the TMA
                   // stores may read
  // The dK/dV kernel's atomic dQ (bwd_dq_atomic.h):
  DsReady = 1,  // a step's dSᵀ is in shared memory: both warpgroups' (split N), or DsReady + w: warpgroup w's
  KFree = 3,    // split N: every warpgroup's last dQ product has read K: dK may go over it
  BwdEnd = 4,   // one past the last
};
static_assert(cutlass::arch::NamedBarrier::ReservedNamedBarrierCount + uint32_t(BwdBarrier::BwdEnd) <=
                  cutlass::arch::NamedBarrier::HardwareMaxNumNamedBarriers,
              "the backward's barriers outnumber the hardware's 16");

CUTE_DEVICE void barrier_sync(int threads, BwdBarrier id, int offset = 0) {
  cutlass::arch::NamedBarrier::sync(threads, static_cast<uint32_t>(id) + offset);
}

}  // namespace flash::sm90
