"""lm-eval's own task definitions, fed from local files instead of the HuggingFace hub.

Prompts, choices, few-shot rules and metrics stay exactly lm-eval's; only where the rows come
from changes. A task whose ``dataset_path`` is one of the hub datasets below reads
``DATA_DIR/<folder>/<split>.jsonl`` (HF schema, one JSON object per line) instead:

    allenai/ai2_arc ARC-Easy       -> arc_easy/{train,validation,test}.jsonl
    allenai/ai2_arc ARC-Challenge  -> arc_challenge/{train,validation,test}.jsonl
    Rowan/hellaswag                -> hellaswag/{train,validation}.jsonl
    cais/mmlu, hails/mmlu_no_train -> mmlu/{dev,validation,test}.jsonl  (one file, rows filtered by `subject`)
    EleutherAI/wikitext_document_level wikitext-2-raw-v1 -> wikitext-2-raw/{valid,test}.txt
        (the raw WikiText files, split into articles at top-level headings; looked for in DATA_DIR,
        then in DATA_DIR/../corpus, where shared/data keeps them)

Tasks in ``bundled/`` (``tinyshakespeare_heldout``) carry their own data and are always known.

Every task the harness builds passes through ``LocalDataFactory._load_full_config``, so groups
(``mmlu`` = 57 subject tasks) and variants (``mmlu_continuation``, ...) are covered alike.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager
from lm_eval.tasks._factory import TaskFactory

from bitnet_cli.errors import BitnetError
from bitnet_cli.eval.wikitext import wikitext_pages

# (hub dataset_path, dataset_name or None for any) -> folder under the data dir
HUB_TO_LOCAL: dict[tuple[str, str | None], str] = {
    ("allenai/ai2_arc", "ARC-Easy"): "arc_easy",
    ("allenai/ai2_arc", "ARC-Challenge"): "arc_challenge",
    ("Rowan/hellaswag", None): "hellaswag",
    ("cais/mmlu", None): "mmlu",
    ("hails/mmlu_no_train", None): "mmlu",
    ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1"): "wikitext-2-raw",
}
# WikiText ships as the raw text files; their names are the original ones.
WIKITEXT_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def local_folder(dataset_path: str | None, dataset_name: str | None) -> str | None:
    return HUB_TO_LOCAL.get((dataset_path, dataset_name)) or HUB_TO_LOCAL.get((dataset_path, None))


@functools.lru_cache(maxsize=16)
def _read_jsonl(path: Path) -> tuple[dict, ...]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BitnetError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return tuple(rows)


class LocalDataset:
    """``custom_dataset`` for one task: its split files, read once per process and shared."""

    def __init__(self, files: dict[str, Path], subject: str | None = None, raw_text: bool = False):
        self.files, self.subject, self.raw_text = files, subject, raw_text

    def __call__(self, **_task_metadata: Any):
        import datasets

        splits = {}
        for split, path in self.files.items():
            if self.raw_text:
                rows = [{"page": p} for p in wikitext_pages(path.read_text(encoding="utf-8"))]
            else:
                rows = _read_jsonl(path)
                if self.subject is not None:
                    rows = [r for r in rows if r.get("subject") == self.subject]
                    if not rows:
                        raise BitnetError(f"{path}: no rows with subject {self.subject!r}")
            splits[split] = datasets.Dataset.from_list(list(rows))
        return datasets.DatasetDict(splits)

    def __repr__(self) -> str:  # lm-eval prints this into the results' task configs
        where = ", ".join(str(p) for p in self.files.values())
        return f"local files: {where}" + (f" (subject={self.subject})" if self.subject else "")


class ProcessOnce:
    """A task's ``process_docs``, run once per split.

    lm-eval calls it on every docs access; hub datasets answer repeats from datasets' on-disk
    cache, in-memory local ones would redo the work (HellaSwag: seconds per call).
    """

    def __init__(self, fn):
        self.fn, self._done = fn, {}

    def __call__(self, dataset):
        key = id(dataset)
        if key not in self._done:  # the dataset is kept alive with its result, so ids stay unique
            self._done[key] = (dataset, self.fn(dataset))
        return self._done[key][1]

    def __repr__(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"


class LocalDataFactory(TaskFactory):
    """lm-eval's task factory, rewriting hub datasets to files under ``data_dir``."""

    def __init__(self, data_dir: Path, num_fewshot: int | None, meta: dict[str, Any] | None = None):
        super().__init__(meta=meta)
        self.data_dir, self.num_fewshot = data_dir, num_fewshot

    def _load_full_config(self, entry, overrides=None) -> dict[str, Any]:
        cfg = super()._load_full_config(entry, overrides)
        folder = local_folder(cfg.get("dataset_path"), cfg.get("dataset_name"))
        return cfg if folder is None else self._to_local(cfg, folder)

    def _to_local(self, cfg: dict[str, Any], folder: str) -> dict[str, Any]:
        task = cfg.get("task")
        raw_text = folder.startswith("wikitext")
        eval_split = cfg.get("test_split") or cfg.get("validation_split")
        shots = self.num_fewshot if self.num_fewshot is not None else cfg.get("num_fewshot") or 0
        fewshot_split = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
        where = self.data_dir / folder
        if raw_text and not where.is_dir():  # shared/data keeps raw text in corpus/, beside eval/
            where = self.data_dir.parent / "corpus" / folder
        files = {}
        for key in SPLIT_KEYS:
            split = cfg.get(key)
            if split is None:
                continue
            name = WIKITEXT_FILES.get(split, f"{split}.txt") if raw_text else f"{split}.jsonl"
            path = where / name
            if path.is_file():
                files[split] = path
            elif split == eval_split or (shots > 0 and split == fewshot_split):
                raise BitnetError(f"task {task}: data file not found: {path}")
            else:  # a split this run never reads (e.g. HellaSwag's train split at 0 shots)
                cfg[key] = None
        cfg["custom_dataset"] = LocalDataset(files, subject=self._subject(cfg, folder), raw_text=raw_text)
        cfg["dataset_kwargs"] = None
        if callable(cfg.get("process_docs")):
            cfg["process_docs"] = ProcessOnce(cfg["process_docs"])
        cfg["metadata"] = {**cfg.get("metadata", {}), "local_data": str(where)}
        return cfg

    @staticmethod
    def _subject(cfg: dict[str, Any], folder: str) -> str | None:
        name = cfg.get("dataset_name")
        return name if folder == "mmlu" and name not in (None, "all") else None


# Tasks shipped with bitnet-cli, data included (no hub, no --data-dir): one YAML each, named as its task.
BUNDLED_TASKS_DIR = Path(__file__).with_name("bundled")


def bundled_task_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED_TASKS_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=1)
def _indexed_task_manager() -> TaskManager:
    # indexes ~14k task YAML files: seconds, so once per process
    return TaskManager(include_path=str(BUNDLED_TASKS_DIR))


def task_manager(data_dir: str | Path | None = None, num_fewshot: int | None = None) -> TaskManager:
    """lm-eval's TaskManager; with ``data_dir`` its hub datasets come from local files."""
    if data_dir is not None and not Path(data_dir).is_dir():  # before the index is built (seconds)
        raise BitnetError(f"data_dir {data_dir}: no such directory", param="data_dir")
    tm = copy.copy(_indexed_task_manager())
    if data_dir is not None:
        data_dir = Path(data_dir)
        # lm-eval 0.4.13 builds every task through this factory (TaskManager has no public hook).
        tm._factory = LocalDataFactory(data_dir, num_fewshot, meta=tm.metadata)
    return tm


def check_task_file(path: Path) -> None:
    """A task given as a YAML path must be an lm-eval task or group config."""
    from lm_eval.tasks._index import TaskIndex

    try:
        entry = TaskIndex.entry_from_path(path)
    except Exception as e:  # yaml errors, lm-eval's "Unknown config shape" ValueError, bad !function tags
        raise BitnetError(f"{path}: not an lm-eval task YAML ({e})") from None
    if entry is None:
        raise BitnetError(f"{path}: not an lm-eval task YAML (it names no task or group)")


def check_task_names(tm: TaskManager, names: list[str]) -> None:
    """Unknown task names fail early, with lm-eval's closest names as suggestions."""
    known = set(tm.all_tasks)
    for name in names:
        if name in known:
            continue
        if Path(name).is_file():
            check_task_file(Path(name))
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"; did you mean: {', '.join(close)}?" if close else " (see `lm-eval ls tasks`)"
        raise BitnetError(f"unknown task {name!r}{hint}")
