"""Step profiles: the category rules on kernel and operator names as GPUs and CPUs report them, and
nbp-bench-train --profile end to end on the CPU (a trace file, shares that add up to the step)."""

from __future__ import annotations

import json

import pytest
import torch

from nbp_ds.cli.bench_train import main as bench_train
from nbp_ds.config import load_config
from nbp_ds.perf.profile import CATEGORIES, Op, categorize, profile_steps, step_shares
from nbp_ds.perf.train_step import build_training, make_step, random_batch

OPT = ("Optimizer.step#AdamW.step", "ProfilerStep#3")
NAMED = [
    # CUDA kernels, with the operator that launched them (names as cuBLAS, flash, cuDNN, Triton, NCCL give them)
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_cublas", Op("aten::mm"), "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", Op("aten::mm", ("linear_cross_entropy",)), "loss/head"),
    ("void at::native::vectorized_elementwise_kernel<4, MulFunctor<float>>",
     Op("aten::mul", ("_LinearCrossEntropyBackward", "autograd::engine::evaluate_function: "
                                                     "_LinearCrossEntropyBackward")), "loss/head"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128, 64, 4>>", Op("aten::_flash_attention_"
                                                                                         "forward"), "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128", Op("aten::_cudnn_attention_"
                                                                                        "forward"), "attention"),
    ("triton_tem_fused_0", Op("triton_tem_fused_0", ancestors=("CompiledFunction",)), "attention"),  # flex
    ("triton_tem_fused_addmm_1", Op("triton_tem_fused_addmm_1"), "matmul"),  # a max-autotune matmul template
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", Op("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0"),
     "norm/rope/activation"),
    ("triton_poi_fused_cat_mul_sub_1", Op("triton_poi_fused_cat_mul_sub_1"), "norm/rope/activation"),
    ("triton_red_fused_argmax_exp_logsumexp_sub_0", Op("triton_red_fused_argmax_exp_logsumexp_sub_0",
                                                       ancestors=("linear_cross_entropy",)), "loss/head"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel_cuda>", Op("aten::silu"),
     "norm/rope/activation"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", Op("aten::_fused_adamw_", ancestors=OPT),
     "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", Op("nccl:all_reduce"),
     "communication"),
    ("Memcpy HtoD (Pageable -> Device)", Op("aten::copy_"), "other"),
    ("void at::native::indexSelectLargeIndex<float, long>", Op("aten::index_select"), "other"),
    # CPU operators' own time
    (None, Op("aten::mm"), "matmul"),
    (None, Op("aten::bmm", ancestors=("aten::_scaled_dot_product_attention_math", "aten::scaled_dot_product_"
                                                                                   "attention")), "attention"),
    (None, Op("aten::exp", ancestors=("linear_cross_entropy",)), "loss/head"),
    (None, Op("aten::rsqrt"), "norm/rope/activation"),
    (None, Op("aten::mul", ancestors=OPT), "optimizer"),
    (None, Op("aten::embedding"), "other"),
]


@pytest.mark.parametrize("kernel, op, category", NAMED, ids=[f"{c}:{(k or o.name)[:30]}" for k, o, c in NAMED])
def test_categories_of_kernels_and_operators(kernel, op, category):
    assert categorize(kernel, op) == category


def test_a_cpu_step_profile_adds_up_and_sees_every_part(tmp_path):
    cfg = load_config("tiny", ["model.attention=sdpa"])
    device = torch.device("cpu")
    model, optimizer, autocast = build_training(cfg, device, "fp32")
    step = make_step(model, optimizer, autocast, random_batch(cfg, 4, device))
    prof, trace = profile_steps(step, tmp_path, steps=2, device=device)
    assert "traceEvents" in json.loads(trace.read_text())  # what Perfetto / TensorBoard open
    shares = step_shares(prof.events(), device)
    assert shares.steps == 2 and set(shares.ms) == set(CATEGORIES)
    for category in ("matmul", "attention", "norm/rope/activation", "loss/head", "optimizer"):
        assert shares.ms[category] > 0, (category, shares.table())
    assert shares.ms["communication"] == 0
    assert sum(shares.ms.values()) == pytest.approx(shares.step_ms, rel=0.05), shares.table()


def test_bench_train_profile_prints_the_shares(tmp_path, capsys):
    status = bench_train(["--config", "tiny", "--steps", "1", "--warmup", "1", "--profile", str(tmp_path),
                          "--profile-steps", "1", "model.attention=sdpa", "train.activation_checkpointing=selective"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "selective" in out and "time per step by category" in out
    assert list((tmp_path / "auto-mb4").glob("*.pt.trace.json"))
    shares = {line.split()[0]: float(line.split()[-1].rstrip("%")) for line in out.splitlines()
              if line.startswith("  ") and line.split()[0] in CATEGORIES}
    assert set(shares) == set(CATEGORIES) and sum(shares.values()) == pytest.approx(100, abs=6)


def _trace_steps(folder) -> list[list[int]]:
    """The ProfilerStep numbers of each trace in ``folder`` (a Chrome trace: what Perfetto and TensorBoard read)."""
    return [sorted(int(e["name"].split("#")[1]) for e in json.loads(trace.read_text())["traceEvents"]
                   if e.get("name", "").startswith("ProfilerStep#"))
            for trace in sorted(folder.glob("*.pt.trace.json"))]


@pytest.mark.parametrize("window, first_step, traced", [
    ([3, 5], 1, [3, 4, 5]),  # a warm-up step (2) runs untraced
    ([1, 2], 1, [1, 2]),
    ([3, 5], 4, [4, 5]),  # resumed inside the window: the rest of it
    ([3, 5], 6, None),  # resumed after it: nothing
])
def test_the_trainers_profile_window_traces_exactly_its_steps(tmp_path, window, first_step, traced):
    from nbp_ds.runtime.profiling import StepWindow

    cpu = torch.device("cpu")
    x = torch.randn(64, 64)
    profiled = StepWindow(window, tmp_path / "profile", cpu, rank=0, enabled=True)
    for step in range(first_step, 9):
        profiled.before_step(step)
        (x @ x).sum()
        profiled.after_step(step)
    profiled.close()
    assert _trace_steps(tmp_path / "profile") == ([traced] if traced else [])
    StepWindow(window, tmp_path / "other", cpu, rank=1, enabled=False).before_step(window[0])
    assert not (tmp_path / "other").exists()  # a rank not asked to trace writes nothing


def test_an_out_of_memory_error_leaves_a_snapshot_beside_the_trace(tmp_path, monkeypatch):
    """The CUDA calls are replaced (no GPU here): what is checked is that recording starts, that the error
    dumps the history into the profile folder and goes on, and that the CPU does none of it."""
    from nbp_ds.runtime import profiling

    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: open(path, "wb").write(b"snapshot"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with profiling.oom_snapshot(tmp_path, torch.device("cuda", 0), rank=3, enabled=True):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert (tmp_path / "oom_rank3.pickle").read_bytes() == b"snapshot"
    assert calls == [{"max_entries": profiling.MEMORY_HISTORY_ENTRIES}, {"enabled": None}]
    calls.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with profiling.oom_snapshot(tmp_path / "cpu", torch.device("cpu"), rank=0, enabled=True):
            raise torch.cuda.OutOfMemoryError("not from this device")
    assert calls == [] and not (tmp_path / "cpu").exists()
