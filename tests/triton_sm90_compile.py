"""Compile the Triton conv kernels for sm_90 (H100) with no GPU present, and report what the
compiler made of them: JSON lines {kernel, variant, shared, stage_bytes, cp_async, wgmma}
(stage_bytes: shared memory of one bf16 stage of the two operand tiles).

Run as a script without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
Launches specialize integer arguments (1 becomes a constant, multiples of 16 are marked
divisible) and pointers (16-byte aligned); this emulates that for a channels_last ResNet conv
(unit channel strides, every other stride and channel count a multiple of 16), so the result is
the code a real launch gets: Hopper MMA (wgmma) and cp.async software pipelining of the loads.
"""
import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedres.kernels import conv_triton as ct

UNIT_STRIDES = ("sxc", "swi", "syc", "src", "sdc", "sgc")
HALF_POINTERS = ("x_ptr", "w_ptr", "y_ptr", "res_ptr", "dy_ptr", "dx_ptr")


def compile_for_sm90(fn, constexprs, num_warps, num_stages):
    constexprs = dict(constexprs)
    fp32_pointers = constexprs.pop("fp32_pointers", ())
    constexprs.update({name: 1 for name in UNIT_STRIDES if name in fn.arg_names})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in HALF_POINTERS and name not in fp32_pointers else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("s") or name.startswith("C_") or name == "w_span":
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def variants():
    # grouped: ResNeXt-50 layer1's 32 groups of 4 channels in 64-wide tiles, spans 16-aligned
    common = dict(KH=3, KW=3, ACC=tl.float32, UPCAST=False, PRECISION=None, SPAN_ALIGN=16, SPAN_STEP=0)
    for grouped in (False, True):
        tag = "grouped" if grouped else "dense"
        if grouped:
            common["SPAN_STEP"] = 64  # 64-wide tiles of 4-channel groups: 16 whole groups, 64 channels
        yield ("forward", f"{tag} 3x3, BN-ReLU prologue, statistics epilogue", ct._conv_fwd_kernel,
               dict(common, GROUPED=grouped, PLAIN_GEMM=False, PROLOGUE=True, PROLOGUE_RELU=True, HAS_BIAS=False,
                    HAS_RES=False, RELU=False, STATS=True, BLOCK_M=128, BLOCK_N=64 if grouped else 128,
                    BLOCK_K=64, GROUP_M=8), 8)
        yield ("input grad", f"{tag} 3x3, BN-ReLU epilogue", ct._conv_dgrad_kernel,
               dict(common, GROUPED=grouped, TAP_CHECK=False, EPILOGUE_BN=True, ACCUMULATE=False, EPILOGUE_RELU=True,
                    BLOCK_M=128, BLOCK_N=64 if grouped else 128, BLOCK_K=64), 8)
        yield ("weight grad", f"{tag} 3x3, BN-ReLU prologue", ct._conv_wgrad_kernel,
               dict(common, GROUPED=grouped, PROLOGUE=True, PROLOGUE_RELU=True, BLOCK_O=64 if grouped else 128,
                    BLOCK_C=64 if grouped else 128, BLOCK_M=64), 8)
    # the default tiles for ResNeXt-50 layer1's 4-channel groups: 16 wide, 4 groups per tile
    small = dict(common, SPAN_STEP=16, GROUPED=True)
    yield ("forward", "grouped 3x3, 16-wide tiles", ct._conv_fwd_kernel,
           dict(small, PLAIN_GEMM=False, PROLOGUE=True, PROLOGUE_RELU=True, HAS_BIAS=False, HAS_RES=False,
                RELU=False, STATS=True, BLOCK_M=128, BLOCK_N=16, BLOCK_K=16, GROUP_M=8), 4)
    yield ("weight grad", "grouped 3x3, 16x16 tiles", ct._conv_wgrad_kernel,
           dict(small, PROLOGUE=True, PROLOGUE_RELU=True, BLOCK_O=16, BLOCK_C=16, BLOCK_M=128), 2)
    # a dense layer's conv1 backward: adds scale * dU into the float32 gradient buffer's prefix
    yield ("input grad", "1x1, BN-ReLU epilogue accumulating into a float32 buffer", ct._conv_dgrad_kernel,
           dict(common, KH=1, KW=1, GROUPED=False, TAP_CHECK=False, EPILOGUE_BN=True, ACCUMULATE=True,
                EPILOGUE_RELU=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, fp32_pointers=("dx_ptr",)), 8)
    yield ("forward", "1x1 plain GEMM, bias + residual + ReLU epilogue", ct._conv_fwd_kernel,
           dict(common, KH=1, KW=1, GROUPED=False, PLAIN_GEMM=True, PROLOGUE=False, PROLOGUE_RELU=False,
                HAS_BIAS=True, HAS_RES=True, RELU=True, STATS=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                GROUP_M=8), 8)


def main():
    for kernel, variant, fn, constexprs, warps in variants():
        compiled = compile_for_sm90(fn, constexprs, warps, 3)
        ptx = compiled.asm["ptx"]
        c = constexprs
        if "BLOCK_O" in c:  # wgrad: dy tile [BLOCK_O, BLOCK_M], input tile [BLOCK_M, BLOCK_C]
            stage = 2 * c["BLOCK_M"] * (c["BLOCK_O"] + c["BLOCK_C"])
        else:
            stage = 2 * c["BLOCK_K"] * (c["BLOCK_M"] + c["BLOCK_N"])
        print(json.dumps(dict(kernel=kernel, variant=variant, shared=compiled.metadata.shared, stage_bytes=stage,
                              cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                              wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"))), flush=True)


if __name__ == "__main__":
    sys.exit(main())
