"""The benchmarks behind ``rnndeploy bench``; they ship with the package so the command runs from any install.

``kernels``: the Triton kernels against cuDNN (GPU). ``memory``: long time lags (adding problem, copy task).
``runtime``: per-step latency, batched streams and the server. ``serving`` and ``load``: a server process and
KServe v2 load from client processes (``python -m rnndeploy.bench.load``). Each module imports what it
measures; importing this package imports nothing heavy.
"""
