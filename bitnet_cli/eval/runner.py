"""``evaluate(model, tasks)``: lm-eval on a packed file or a checkpoint, the library side of `bitnet eval`."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

from bitnet_cli import safejson
from bitnet_cli.engine import DEFAULT_KV_CACHE
from bitnet_cli.errors import BitnetError
from bitnet_cli.files import TempFile

DATA_ENV = "BITNET_EVAL_DATA"
DEFAULT_BATCH_SIZE = 8  # sequences per forward pass on torch (`bitnet eval --batch-size`)


def evaluate(
    model: str | Path,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    data_dir: str | Path | None = None,
    log_samples: bool = False,
    progress=None,
    lm=None,
    kv_cache: str = DEFAULT_KV_CACHE,
    ctx_size: int | None = None,
) -> dict[str, Any]:
    """Run lm-eval's ``tasks`` on ``model`` (packed ``.bin`` or checkpoint directory).

    ``data_dir`` (default: ``$BITNET_EVAL_DATA``) makes the tasks read local JSONL files instead
    of the hub (see :mod:`bitnet_cli.eval.tasks`). ``lm`` passes an already-built adapter.
    ``kv_cache``: the C engine's KV cache element type (bitnet_cli.engine.KV_CACHE_TYPES). ``ctx_size``: the
    context window in tokens (default: the model's, on the C engine at most 4096); longer contexts are cut from the
    left. Returns lm-eval's results dict (``results``, ``configs``, ``n-shot``, ... and ``samples``
    when ``log_samples``).
    """
    import lm_eval

    from bitnet_cli.eval.adapter import BitNetLM
    from bitnet_cli.eval.tasks import bundled_task_names, check_task_names, task_manager

    if not tasks:
        raise BitnetError("no tasks given (e.g. arc_easy,hellaswag)", param="tasks")
    if num_fewshot is not None and num_fewshot < 0:
        raise BitnetError(f"num_fewshot {num_fewshot}: must be 0 or more", param="num_fewshot")
    if ctx_size is not None and (type(ctx_size) is not int or ctx_size < 1):  # 0 read as "the default" before
        raise BitnetError(f"ctx_size {ctx_size!r}: must be 1 or more", param="ctx_size")
    if limit is not None and not (math.isfinite(limit) and limit > 0):  # nan and inf reached int(): a traceback
        raise BitnetError(f"limit {limit:g}: must be positive and finite", param="limit")
    if lm is None and not Path(model).exists():  # before lm-eval indexes its tasks (seconds)
        raise BitnetError(f"{model}: no such file or directory (expected a packed .bin file or a checkpoint directory)")
    if lm is None:
        from bitnet_cli.eval.backends import check_kv_cache

        check_kv_cache(model, kv_cache)
    data_dir = data_dir or os.environ.get(DATA_ENV) or None
    from_hub = [t for t in tasks if not Path(t).is_file() and t not in bundled_task_names()]
    if data_dir is None and from_hub:
        why = hub_unreachable()
        if why:  # lm-eval would retry the hub for half a minute, then print a long traceback
            # the names are lm-eval's to check (its index takes seconds): they are quoted so that a typo shows
            raise BitnetError(f"{why}, so the data of task(s) {', '.join(map(repr, from_hub))} cannot be downloaded "
                              f"(check the names too): give data_dir DIR (or set {DATA_ENV}) with local task files, "
                              f"e.g. ../shared/data/eval", param="data_dir")
    tm = task_manager(data_dir, num_fewshot)
    check_task_names(tm, tasks)
    if lm is None:
        lm = BitNetLM(pretrained=str(model), threads=threads, batch_size=batch_size, progress=progress,
                      kv_cache=kv_cache, max_length=ctx_size)
    with _quiet_git_describe():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=log_samples,
            task_manager=tm,
        )
    results["config"]["model"] = "bitnet"
    results["config"]["model_args"] = {"pretrained": str(model), "backend": lm.backend.name}
    if lm.backend.name == "engine":
        results["config"]["model_args"]["kv_cache"] = lm.backend.engine.kv_cache
    # requests whose continuation alone exceeds the context window, scored -inf (see BitNetLM._fit)
    results["config"]["refused_requests"] = {"count": lm.refused, "longest_continuation": lm.longest_refused,
                                             "context_window": lm.max_length}
    if data_dir is not None:
        results["config"]["data_dir"] = str(data_dir)
    return results


def quiet_lm_eval() -> None:
    """No progress bars or log lines of lm-eval's own: the CLI draws one rich bar and prints the table.

    (tqdm reads TQDM_DISABLE when it is first imported: call this before importing torch or lm-eval.)
    """
    import logging

    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot serve task data now, or None when it can be tried.

    Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or no connection to the endpoint within
    ``timeout``) with an empty datasets cache: lm-eval could only fail, slowly.
    """
    import socket
    from urllib.parse import urlparse

    cache = Path(os.environ.get("HF_DATASETS_CACHE")
                 or Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "datasets")
    if cache.is_dir() and any(cache.iterdir()):
        return None  # datasets may answer from its cache, online or not
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_true(name):
            return f"{name} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    try:
        socket.create_connection((host, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return f"the Hugging Face hub ({host}) cannot be reached"
    return None


@contextlib.contextmanager
def _quiet_git_describe():
    """lm-eval records the working directory's git commit by running ``git describe`` with stderr
    left open, so outside a git checkout every run printed "fatal: not a git repository". For the
    duration of the run, its evaluator gets the same lookup with git's stderr discarded."""
    import subprocess

    from lm_eval import evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def git_commit_hash() -> str | None:
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
            return done.stdout.strip()
        except (subprocess.CalledProcessError, OSError):
            return get_commit_from_path(os.getcwd())

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = git_commit_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def check_output(path: str | Path, *, force: bool = False, inputs=()) -> Path:
    """A results file path that can be written (checked before the evaluation, which takes minutes).

    An existing file is replaced only with ``force``, and never when it is one of ``inputs`` (the
    model file, or a file inside the model's checkpoint directory or the data directory).
    """
    from bitnet_cli.pack.format import check_output_path

    out = Path(path)
    if out.exists():
        for given in inputs:
            if given is None or not Path(given).exists():
                continue
            source = Path(given).resolve()
            target = out.resolve()
            if target == source or (source.is_dir() and target.is_relative_to(source)):
                raise BitnetError(f"output {out}: is an input of this evaluation ({given}); choose another file",
                                  param="output")
    check_output_path(out, force=force)
    return out


def result_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr): group aggregates (e.g. mmlu) first, then every task."""
    rows = []
    for section in ("groups", "results"):
        entries = list(results.get(section, {}).items())
        if section == "groups":
            entries.reverse()  # lm-eval lists a group after its subgroups; the overall score goes first
        for task, metrics in entries:
            if section == "results" and task in results.get("groups", {}):
                continue  # a group's aggregate is listed once, from "groups"
            for key, value in metrics.items():
                metric, comma, filt = key.partition(",")  # "acc,none": metric, then lm-eval's filter
                if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                stderr = stderr if isinstance(stderr, (int, float)) and not math.isnan(stderr) else None
                rows.append((metrics.get("alias", task).strip(" -"), metric, float(value), stderr))
    return rows


def write_results(results: dict[str, Any], path: str | Path, *, force: bool = False, inputs=()) -> Path:
    """Write the results JSON atomically: a temp file in the same directory, then rename."""
    out = check_output(path, force=force, inputs=inputs)
    temp = TempFile(out)
    try:
        with os.fdopen(os.dup(temp.fd), "w", encoding="utf-8") as f:
            f.write(safejson.dumps(results, indent=2, default=_non_serializable))  # a non-UTF-8 path: escaped
        temp.publish()
    except BaseException:
        temp.discard()
        raise
    return out


def _non_serializable(value):
    """lm-eval's stand-in for the odd object its results hold (perplexity results hold none: no lm-eval needed)."""
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(value)
