"""nbp-bench-attention on the CPU: the CPU-capable backends at the tiny config's shape, with the causal
reference and the ratio to it (figures are printed, not checked: speed targets live in the output)."""

from __future__ import annotations

from nbp_ds.cli.bench_attention import main as bench_attention


def test_bench_attention_times_what_runs_here_and_says_why_not_the_rest(capsys):
    status = bench_attention(["--repeats", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    rows = {line.split("  ")[1].strip(): line.split() for line in out.splitlines() if line.startswith("  ")
            and not line.startswith("  not measured") and "backend" not in line}
    assert float(rows["causal sdpa"][-3]) > 0 and rows["causal sdpa"][-2] == "1.00"  # the reference row
    assert float(rows["sdpa (dense mask)"][-3]) > 0 and float(rows["sdpa (dense mask)"][-2]) > 0
    assert "not measured: flex: model.attention=flex has no backward pass on CPU" in out
    assert "tiny: 2 x 4 heads x 49 positions x 16" in out and "model.attention=auto picks: sdpa" in out


def test_bench_attention_names_a_bad_config_key(capsys):
    assert bench_attention(["model.flex_kernel_options={BLOK_M: 64}"]) == 2
    assert "BLOK_M" in capsys.readouterr().err
