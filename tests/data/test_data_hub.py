"""Built-in tasks without local files: read with `datasets` from hub-shaped repos; offline errors.

The hub repos are laid out here as on the hub (parquet per split, a README declaring configs),
built from the shared data, and reached through $LORAFLEET_HUB_DIR: tests never download."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lorafleet.data.tasks as tasks
from lorafleet.data import DataError, load_examples
from lorafleet.data.readers import iter_rows
from lorafleet.paths import data_dir

DATA = data_dir()
pytestmark = pytest.mark.skipif(
    DATA is None or not (DATA / "sst2").is_dir(), reason="shared data sets not found"
)  # the same condition as test_data_builtin.py: the data is this project's, CI has it
SST2_TRAIN_ROWS = 300  # of 65k: enough to compare, quick to convert


def _rows(path, limit=None) -> list[dict]:
    return [row for _, row in iter_rows(path)][:limit]


def _parquet(path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _configs_readme(repo, config: str, splits: dict[str, str]) -> None:
    files = "".join(f"  - split: {s}\n    path: {p}\n" for s, p in splits.items())
    (repo / "README.md").write_text(
        f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n# mirror\n"
    )


def _clutrr_hub_row(row: dict) -> dict:
    """The local clutrr row as CLUTRR/v1 publishes it (story, query, f_comb, target_text)."""
    story, asked = row["question"].split("\nQuestion: ")
    chain, kinship = row["answer"].split(" #### ")
    a, b = asked.removeprefix("How is [").removesuffix("]?").split("] related to [")
    return {
        "id": str(row["id"]),
        "story": story,
        "query": str((b, a)),
        "target_text": kinship,
        "f_comb": chain,
        "task_name": f"task_1.{row['k']}",
    }


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """<dir>/<owner>/<name>/ for the four datasets, as their hub repositories lay them out."""
    root = tmp_path_factory.mktemp("hub")
    sst2 = root / "stanfordnlp" / "sst2" / "data"
    for split, rows in (
        ("train", _rows(DATA / "sst2/train.tsv", SST2_TRAIN_ROWS)),
        ("validation", _rows(DATA / "sst2/validation.tsv")),
    ):
        rows = [
            {"idx": i, "sentence": r["sentence"], "label": int(r["label"])}
            for i, r in enumerate(rows)
        ]
        _parquet(sst2 / f"{split}-00000-of-00001.parquet", rows)
    strategyqa = root / "ChilleD" / "StrategyQA" / "data"
    for split, name in (("train", "train"), ("test", "dev")):
        keep = ("term", "description", "question", "answer", "facts")
        rows = [{k: r[k] for k in keep} for r in _rows(DATA / f"strategyqa/{name}.jsonl")]
        _parquet(strategyqa / f"{split}-00000-of-00001.parquet", rows)
    gsm8k = root / "openai" / "gsm8k"
    _parquet(gsm8k / "main" / "train-00000-of-00001.parquet", _rows(DATA / "gsm8k/train.jsonl"))
    _configs_readme(gsm8k, "main", {"train": "main/train-*"})
    clutrr, config = root / "CLUTRR" / "v1", "gen_train234_test2to10"
    for split, name in (("train", "train"), ("validation", "dev")):
        rows = [_clutrr_hub_row(r) for r in _rows(DATA / f"clutrr/{name}.jsonl", 400)]
        _parquet(clutrr / config / split / "0000.parquet", rows)
    _configs_readme(clutrr, config, {s: f"{config}/{s}/*" for s in ("train", "validation")})
    return root


def _shape(data) -> list[tuple]:
    return [(e.prompt, e.target, e.choices, e.label) for e in data]


# (task, split, limit): the hub path must give exactly the examples the local files give
CASES = [
    ("sst2", "train", 50),
    ("sst2", "validation", None),
    ("strategyqa", "train", None),
    ("strategyqa", "validation", None),
    ("gsm8k", "train", 20),
    ("gsm8k", "validation", None),
    ("clutrr", "train", 100),
    ("clutrr", "validation", 100),
]


def test_hub_datasets_give_the_local_examples(hub_dir, monkeypatch, tokenizer):
    monkeypatch.setenv("LORAFLEET_HUB_DIR", str(hub_dir))
    local = {
        case: load_examples(case[0], tokenizer, split=case[1], limit=case[2], chat=False)
        for case in CASES
    }
    monkeypatch.setattr(tasks, "data_dir", lambda: None)  # no $LORAFLEET_DATA, no ../shared
    for task, split, limit in CASES:
        hub = load_examples(task, tokenizer, split=split, limit=limit, chat=False)
        expected = local[(task, split, limit)]
        assert _shape(hub) == _shape(expected), (task, split)
        assert (hub.name, hub.metric, hub.answer_marker) == (
            expected.name,
            expected.metric,
            expected.answer_marker,
        )
        dataset = tasks.BUILTIN_TASKS[task].hub.dataset
        assert hub.examples[0].source.startswith(dataset + ":"), hub.examples[0].source
    # gsm8k's validation is still the last 500 rows of the hub's train split, disjoint from train
    assert len(load_examples("gsm8k", tokenizer, split="validation", chat=False)) == 500
    chat = load_examples("sst2", tokenizer, split="validation", limit=2)  # chat template applies
    assert chat.examples[0].prompt.endswith("<|im_start|>assistant\n")


def test_offline_error_names_the_dataset_and_the_env_var(monkeypatch, tokenizer):
    # Offline mode as `datasets` and huggingface_hub read it: the real hub path, no download.
    import datasets
    import huggingface_hub.constants

    monkeypatch.delenv("LORAFLEET_HUB_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(tasks, "data_dir", lambda: None)
    for task, dataset in (("gsm8k", "openai/gsm8k"), ("clutrr", "CLUTRR/v1")):
        with pytest.raises(DataError) as info:
            load_examples(task, tokenizer, limit=2)
        message = str(info.value)
        assert dataset in message and "$LORAFLEET_DATA" in message and task in message
        assert "\n" not in message


def test_local_data_dir_wins_over_the_hub(monkeypatch, tmp_path, tokenizer):
    # $LORAFLEET_DATA set but without the task's files: the error says where to put them,
    # and the hub (here an empty mirror that would also fail) is not consulted.
    monkeypatch.setenv("LORAFLEET_DATA", str(tmp_path))
    monkeypatch.setenv("LORAFLEET_HUB_DIR", str(tmp_path / "hub"))
    with pytest.raises(DataError, match=r"not found; put the sst2 files"):
        load_examples("sst2", tokenizer)
