"""The fault campaign's parts: plans, kernels, stores, trials and checks (run by benchmarks/faults.py)."""
