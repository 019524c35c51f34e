"""Ahead-of-time compile check of every Triton kernel, for a GPU target, on a machine without one.

    python -m normface_kernels.triton.aot_check [--target sm90 --target sm80] [--dims 128 512]

1. Record. `tiles.launch` is replaced (in tiles.py and in every module that imported it) by a
   recorder that keeps the kernel, its arguments and its launch options and launches nothing.
   The public API (every loss, forward and backward, the normalize switches, the margins, the
   learned scale, cosine_logits) then runs on fake CUDA tensors at the realistic shape
   B=1024, C=1,000,000, D in {128, 512}, for fp16/bf16/fp32/fp64. So the configurations are
   exactly the ones the launchers produce (block sizes, constexprs, num_warps, num_stages): a new
   kernel is picked up without any edit here as long as it launches through tiles.launch.
   Queries of the GPU made by our own code (torch.cuda.get_device_properties & co.) answer as
   the target does (an H100/H200 has 132 SMs).
2. Compile. Each unique (kernel, specialization, options) is compiled with Triton's own
   compiler for GPUTarget("cuda", 90, 32) (and sm_80 on request) -- the same binder and
   specialization the JIT uses at a launch, so the compiled code is what a launch would run.
3. Check. Registers, spill bytes (ptxas -v) and shared memory per kernel and configuration.
   Fails on a compile error, shared memory above the target's per-block limit, more registers
   than a block of that many warps can get, or any spill in a kernel with 16-bit inputs
   (float32/float64 kernels may spill: they are reported, not failed).

Exit status 0 when every configuration passes. Needs triton (3.6 or newer) but no GPU and no
driver; must not run under TRITON_INTERPRET=1.
"""
