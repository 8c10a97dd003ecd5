"""The kernels compile for Hopper (sm90) on a machine without a GPU.

The interpreter checks the kernels' arithmetic, not that Triton's compiler accepts them; this
builds one specialization of each, as a launch would (16-byte aligned pointers, unit strides
folded to constants), to PTX and a cubin with the ptxas that ships in triton's wheel, and
checks that the GEMMs use Hopper's tensor-core instructions (``wgmma``) fed by asynchronous
copies (``cp.async``, the software pipeline). Nothing runs.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton", reason="the gpu/dev extras install triton")

from pipeline.moe import kernels  # noqa: E402

pytestmark = [pytest.mark.skipif(kernels.interpreted(), reason="Triton is interpreting"),
              pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")]


def _compile(fn, types: dict[str, str], consts: dict[str, object], aligned: tuple[str, ...],
             num_warps: int = 8, num_stages: int = 3):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    signature = {n: types.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in types
             if types[n].startswith("*") or n in aligned}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _ptrs(dtype: str, *names: str) -> dict[str, str]:
    return {n: f"*{dtype}" for n in names}


@pytest.mark.parametrize("gated", [True, False], ids=["swiglu", "gelu"])
def test_the_up_projection_builds_for_hopper(gated):
    from pipeline.moe.kernels import grouped_gemm as gg

    types = {**_ptrs("bf16", "x_ptr", "w1_ptr", "w3_ptr", "h_ptr", "pre1_ptr",
                            "pre3_ptr"),
             **_ptrs("i32", "row_slot_ptr", "counts_ptr"),
             **dict.fromkeys(("N", "D", "H", "stride_xt", "stride_we", "stride_wh",
                              "ROWS_KEY"), "i32")}
    consts = dict(stride_wd=1, E=128, E_P=128, TOPK=8, ACT=4 if gated else 1, GATED=gated,
                  SAVE=True, UPCAST=False, PREC="tf32", BLOCK_M=128, BLOCK_N=128,
                  BLOCK_K=64, BUCKET="prefill")
    ptx = _compile(gg._up_kernel, types, consts,
                   ("D", "H", "stride_xt", "stride_we", "stride_wh")).asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async" in ptx


@pytest.mark.parametrize("scatter", [True, False], ids=["combine", "backward-rows"])
def test_the_down_projection_builds_for_hopper(scatter):
    from pipeline.moe.kernels import grouped_gemm as gg

    types = {**_ptrs("bf16", "h_ptr", "w2_ptr", "y_ptr"), "wts_ptr": "*fp32",
             **_ptrs("i32", "row_slot_ptr", "counts_ptr"),
             **dict.fromkeys(("H", "O", "stride_we", "stride_wo", "ROWS_KEY"), "i32")}
    consts = dict(stride_wh=1, E=32, E_P=32, SCATTER=scatter, UPCAST=False, PREC="tf32",
                  BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BUCKET="prefill")
    ptx = _compile(gg._down_kernel, types, consts,
                   ("H", "O", "stride_we", "stride_wo")).asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async" in ptx


def test_the_weight_gradient_builds_for_hopper():
    from pipeline.moe.kernels import grouped_gemm as gg

    types = {**_ptrs("bf16", "a_ptr", "b_ptr", "out_ptr"), **_ptrs("i32", "row_slot_ptr",
                                                                   "counts_ptr"),
             **dict.fromkeys(("M", "P", "stride_b", "ROWS_KEY"), "i32")}
    consts = dict(TOPK=3, GATHER=True, E=32, E_P=32, UPCAST=False, PREC="tf32", BLOCK_M=128,
                  BLOCK_N=128, BLOCK_K=64, BUCKET="prefill")
    assert "mma" in _compile(gg._wgrad_kernel, types, consts, ("M", "P", "stride_b")).asm["ptx"]


@pytest.mark.parametrize("one_kernel", [True, False], ids=["one-launch", "two-launches"])
def test_the_routing_prologue_builds_for_hopper(one_kernel):
    from pipeline.moe.kernels import routing as rt

    common = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "allowed_ptr": "*u8",
              "probs_ptr": "*fp32", "ids_ptr": "*i64", "w_ptr": "*fp32", "T": "i32"}
    consts = dict(E=128, E_P=128, K=8, K_P=8, BLOCK_T=64, HAS_BIAS=True, HAS_ALLOWED=True,
                  RENORM=True, FROM_IDS=False)
    if one_kernel:
        types = {**common, **_ptrs("i32", "counts_ptr", "offsets_ptr", "slot_row_ptr",
                                   "row_slot_ptr")}
        assert _compile(rt._route_one_kernel, types, consts, ()).asm["cubin"]
        return
    assert _compile(rt._route_choose_kernel, {**common, "hist_ptr": "*i32"}, consts,
                    ()).asm["cubin"]
    types = {"ids_ptr": "*i64", **_ptrs("i32", "hist_ptr", "prefix_ptr", "counts_ptr",
                                        "offsets_ptr", "slot_row_ptr", "row_slot_ptr"),
             "T": "i32", "NB": "i32"}
    assert _compile(rt._route_place_kernel, types,
                    dict(E=128, E_P=128, K=8, BLOCK_T=64), ()).asm["cubin"]
