"""`bitnet bench --plot`: thread scaling and achieved decode speed against the roofline, in one PNG."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from bitnet_cli.bench import anchors
from bitnet_cli.bench.report import anchor_label, fmt_bytes
from bitnet_cli.errors import BitnetError


def check_destination(plot: Path, force: bool = False, model: Path | None = None) -> Path:
    """Fail before a long benchmark, not after it, when the plot could not be written: a missing
    directory, a directory in the file's place, an existing file without ``force``, and, ``force`` or
    not, the ``model`` file the benchmark reads (``--plot model.bin --force`` replaced the model)."""
    from bitnet_cli.pack.format import check_output_path

    plot = Path(plot)
    if not plot.parent.is_dir():
        raise BitnetError(f"plot: directory {plot.parent} does not exist", param="plot")
    if model is not None and plot.exists():
        for read in (Path(model), Path(model) / "model.bin"):  # a run directory is read through its model.bin
            with contextlib.suppress(OSError):
                if os.path.samefile(read, plot):
                    raise BitnetError(f"plot {plot}: is the model this benchmark reads ({model}); choose another file",
                                      param="plot")
    try:
        check_output_path(plot, force=force)
    except BitnetError as e:
        params = (e.param,) if isinstance(e.param, str) else tuple(e.param or ())
        raise BitnetError(f"plot: {e}", param=("plot", *params)) from None
    return plot


def plot(results: dict, out: Path, force: bool = False) -> Path:
    """Write the figure to `out` (via a temp file in the same directory, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e, roof = results.get("e2e", []), results.get("roofline", [])
    if not e2e and not roof:
        raise BitnetError("plot needs the e2e or roofline results (choose them with sections)",
                          param=("plot", "sections"))
    fig, (scaling, ceiling) = plt.subplots(1, 2, figsize=(11, 4.2))

    for name in (e2e[0]["tokens_per_s"] if e2e else []):
        xs = [r["threads"] for r in e2e]
        ys = [r["tokens_per_s"][name]["median"] for r in e2e]
        errs = [[y - r["tokens_per_s"][name]["min"] for y, r in zip(ys, e2e)],
                [r["tokens_per_s"][name]["max"] - y for y, r in zip(ys, e2e)]]
        line = scaling.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name)
        scaling.plot(xs, [ys[0] * x / xs[0] for x in xs], ls=":", color=line[0].get_color(), alpha=0.6)
    scaling.set(title="Thread scaling (dotted: linear)", xlabel="threads", ylabel="tokens/s")
    scaling.legend()

    if roof:
        xs = [r["threads"] for r in roof]
        ceiling.plot(xs, [r["decode_ceiling_tps"]["median"] for r in roof], marker="s", color="k",
                     label=f"roofline: bandwidth / {fmt_bytes(results['model']['bytes_per_token']['total'])} per token")
    decode = results["summary"]["decode_vs_roofline"]
    if decode:
        ceiling.plot([d["threads"] for d in decode], [d["tg_tps"] for d in decode], marker="o",
                     label=f"bitnet-cli tg{results['settings']['generate']}")
    for a in anchors.anchors_for(results["model"]["shape"]):
        if a["tg64"] and a["runtime"] != "transformers":
            ths = sorted(a["tg64"])
            ceiling.plot(ths, [a["tg64"][t] for t in ths], ls="--", marker=".", alpha=0.7,
                         label=f"{anchor_label(a)} tg64 ({anchors.DATE}, their machine)")
    ceiling.set(title="Decode: achieved vs roofline", xlabel="threads", ylabel="tokens/s")
    ceiling.legend(fontsize=6.5, loc="upper left", framealpha=0.8)
    threads = results["settings"]["threads"]
    for ax in (scaling, ceiling):
        ax.set_xticks(threads)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.suptitle(f"bitnet bench: {results['model']['name']} on {results['machine']['cpu']}", fontsize=10)
    fig.tight_layout()

    out = check_destination(out, force)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
