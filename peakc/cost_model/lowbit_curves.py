"""Efficiency curves of the low-bit and 2:4 Triton kernels at decode batches: weight
bytes read -> fraction of the copy bandwidth. Written by benchmarks/lowbit_curves.py from
measured runs (SOURCES); refit there, do not edit by hand."""

LOWBIT_CURVES = {
    "lowbit": [
        (10000.0, 0.0007),
        (100000.0, 0.0054),
        (1000000.0, 0.0358),
        (8780000.0, 0.1539),
        (15000000.0, 0.2411),
        (28000000.0, 0.322),
        (60100000.0, 0.4382),
        (118000000.0, 0.5226),
    ],
    "sparse24": [
        (10000.0, 0.0009),
        (100000.0, 0.0067),
        (1000000.0, 0.0449),
        (18900000.0, 0.2431),
        (28300000.0, 0.2856),
        (66100000.0, 0.3716),
        (132000000.0, 0.3792),
    ],
    "sparse24_lowbit": [
        (10000.0, 0.0002),
        (100000.0, 0.0016),
        (1000000.0, 0.0109),
        (6680000.0, 0.0423),
        (10000000.0, 0.0498),
        (23400000.0, 0.0596),
        (46800000.0, 0.058),
    ],
}

SOURCES = {
    "lowbit": [
        "peakc-int4: benchmarks/results/lowbit_kernels_partial.json (NVIDIA H200, 2026-12-03)",
        "peakc-int8: benchmarks/results/lowbit_kernels_partial.json (NVIDIA H200, 2026-12-03)",
    ],
    "sparse24": [
        "peakc-2:4: benchmarks/results/lowbit_kernels.json (NVIDIA H200, 2026-12-03)",
    ],
    "sparse24_lowbit": [
        "peakc-2:4-int4: benchmarks/results/lowbit_kernels.json (NVIDIA H200, 2026-12-03)",
    ],
}
