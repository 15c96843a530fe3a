"""`bitnet bench`: kernel micro-benchmarks, the memory-bandwidth roofline, end-to-end speed.

Library use mirrors the command:

    from bitnet_cli.bench import suite, target
    results = suite.run(target.from_shape("2b4t"), threads=[1, 2], repeat=3,
                        sections=["roofline", "kernels", "e2e"])

`results` is the dict `bitnet bench --json` prints (schema `bitnet-cli/bench/1`).
"""
