"""Dataset loading, seeded splits and client partitions on the real SST-2 / AG News files."""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from helora.shared.errors import ConfigError
from helora.worker.data import (
    AG_NEWS_LABELS,
    FederatedData,
    TextDataset,
    client_partition,
    load_federated_data,
    parse_partition,
    partition_indices,
)

DATA = Path(
    os.environ.get("HELORA_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data"
)
SST2_TRAIN, SST2_DEV, SST2_TEST = 67_349, 872, 1_821
AG_ROWS = 7_600


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"dataset not found at {path} (set HELORA_DATA_DIR)")
    return path


@pytest.fixture(scope="module")
def sst2() -> FederatedData:
    return load_federated_data(str(_need(DATA / "sst2")))


@pytest.fixture(scope="module")
def ag() -> FederatedData:
    return load_federated_data(str(_need(DATA / "ag_news")))


def _ids(ds: TextDataset) -> set[int]:
    assert len(set(ds.source_ids)) == len(ds), "a split repeats a source row"
    return set(ds.source_ids)


def _entropy(labels: list[int]) -> float:
    counts = Counter(labels)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- SST-2 --------------------------------------------------------------------------------------


def test_sst2_sizes_labels_and_names(sst2: FederatedData):
    assert sst2.name == "sst2"
    assert (len(sst2.train), len(sst2.public), len(sst2.eval)) == (SST2_TRAIN - 500, 500, SST2_DEV)
    assert sst2.test is not None and len(sst2.test) == SST2_TEST
    for ds in (sst2.train, sst2.public, sst2.eval, sst2.test):
        assert ds.num_labels == 2 and ds.label_names == ("negative", "positive")
        assert set(ds.labels) == {0, 1}
        assert all(isinstance(t, str) and t for t in ds.texts[:100])
    pool_and_public = [
        a + b for a, b in zip(sst2.train.label_counts(), sst2.public.label_counts(), strict=True)
    ]
    assert pool_and_public == [29_780, 37_569]
    assert sst2.eval.label_counts() == [428, 444]
    # the dev header is label<TAB>content: the text column is found by name
    assert sst2.eval.texts[0] == "one long string of cliches ."


def test_sst2_public_disjoint_from_pool_and_deterministic(sst2: FederatedData):
    pool, public = _ids(sst2.train), _ids(sst2.public)
    assert not pool & public
    assert pool | public == set(range(SST2_TRAIN))
    again = load_federated_data(str(DATA / "sst2"))
    assert again == sst2
    other = load_federated_data(str(DATA / "sst2"), seed=1)
    assert other.public.source_ids != sst2.public.source_ids
    assert other.eval == sst2.eval  # dev.tsv is the whole eval split whatever the seed


def test_sst2_caps(sst2: FederatedData):
    capped = load_federated_data(str(DATA / "sst2"), max_train=1000, eval_size=100, public_size=50)
    assert (len(capped.train), len(capped.public), len(capped.eval)) == (1000, 50, 100)
    assert not _ids(capped.train) & _ids(capped.public)
    assert _ids(capped.eval) <= _ids(sst2.eval)
    full_by_id = dict(zip(sst2.train.source_ids, sst2.train.texts, strict=True))
    full_by_id.update(zip(sst2.public.source_ids, sst2.public.texts, strict=True))
    assert all(
        full_by_id[i] == t for i, t in zip(capped.train.source_ids, capped.train.texts, strict=True)
    )
    # the public slice does not move when only the pool cap changes
    assert load_federated_data(str(DATA / "sst2"), max_train=1000).public == sst2.public
    assert capped == load_federated_data(
        str(DATA / "sst2"), max_train=1000, eval_size=100, public_size=50
    )


def test_single_tsv_file_is_split_three_ways():
    data = load_federated_data(str(_need(DATA / "sst2" / "dev.tsv")), public_size=100, seed=3)
    assert data.name == "sst2"
    assert (len(data.eval), len(data.public), len(data.train)) == (174, 100, SST2_DEV - 274)
    ids = [_ids(data.eval), _ids(data.public), _ids(data.train)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == set(range(SST2_DEV))


# --- AG News ------------------------------------------------------------------------------------


def test_ag_news_sizes_labels_and_names(ag: FederatedData):
    assert ag.name == "ag_news" and ag.test is None
    assert (len(ag.train), len(ag.public), len(ag.eval)) == (AG_ROWS - 1500, 500, 1000)
    for ds in (ag.train, ag.public, ag.eval):
        assert ds.num_labels == 4 and ds.label_names == AG_NEWS_LABELS
        assert set(ds.labels) == {0, 1, 2, 3}
    totals = [
        sum(c)
        for c in zip(*(d.label_counts() for d in (ag.train, ag.public, ag.eval)), strict=True)
    ]
    assert totals == [1900] * 4


def test_ag_news_splits_disjoint_covering_deterministic(ag: FederatedData):
    train, public, ev = _ids(ag.train), _ids(ag.public), _ids(ag.eval)
    assert not (train & public or train & ev or public & ev)
    assert train | public | ev == set(range(AG_ROWS))
    assert load_federated_data(str(DATA / "ag_news")) == ag
    assert load_federated_data(str(DATA / "ag_news" / "news.csv")) == ag
    other = load_federated_data(str(DATA / "ag_news"), seed=7)
    assert other.eval.source_ids != ag.eval.source_ids
    capped = load_federated_data(str(DATA / "ag_news"), public_size=0, eval_size=600, max_train=800)
    assert (len(capped.train), len(capped.public), len(capped.eval)) == (800, 0, 600)
    assert capped.public.num_labels == 4


def test_ag_news_text_cleaning(ag: FederatedData):
    rows = {}
    for ds in (ag.train, ag.public, ag.eval):
        rows.update(zip(ds.source_ids, zip(ds.texts, ds.labels, strict=True), strict=True))
    assert rows[0] == (
        "Fears for T N pension after talks. Unions representing workers at Turner Newall say "
        "they are 'disappointed' after talks with stricken parent firm Federal Mogul.",
        2,
    )
    text, label = rows[1]
    assert label == 3 and "A second team of rocketeers" in text and "the $10 million" in text
    everything = [t for t, _ in rows.values()]
    assert not any(
        "\\" in t or "#39;" in t or "&lt;" in t or "<a href" in t.lower() for t in everything
    )


# --- partitions ---------------------------------------------------------------------------------


def _check_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == n and set(flat) == set(range(n))
    assert all(p == sorted(p) for p in parts)


def test_iid_partitions_near_equal_disjoint_covering(ag: FederatedData):
    labels = ag.train.labels
    parts = partition_indices(labels, 7, scheme="iid", seed=0)
    _check_cover(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert partition_indices(labels, 7, seed=0) == parts
    assert partition_indices(labels, 7, seed=1) != parts
    assert partition_indices([0, 1, 0], 1) == [[0, 1, 2]]


def test_dirichlet_is_skewed_deterministic_and_covering(ag: FederatedData):
    labels = list(ag.train.labels)
    iid = partition_indices(labels, 10, scheme="iid", seed=0)
    skew = partition_indices(labels, 10, scheme="dirichlet", alpha=0.1, seed=0, min_size=10)
    _check_cover(skew, len(labels))
    assert min(len(p) for p in skew) >= 10
    iid_h = sum(_entropy([labels[i] for i in p]) for p in iid) / 10
    skew_h = sum(_entropy([labels[i] for i in p]) for p in skew) / 10
    assert iid_h > 1.9 and skew_h < iid_h - 0.5, (iid_h, skew_h)
    again = partition_indices(labels, 10, scheme="Dirichlet", alpha=0.1, seed=0, min_size=10)
    assert again == skew
    assert partition_indices(labels, 10, scheme="dirichlet", alpha=0.1, seed=1) != skew
    mild = partition_indices(labels, 10, scheme="dirichlet", alpha=1000.0, seed=0)
    assert sum(_entropy([labels[i] for i in p]) for p in mild) / 10 > 1.95


def test_dirichlet_gives_up_with_a_config_error():
    with pytest.raises(ConfigError, match="draws"):
        partition_indices([0, 1] * 10, 10, scheme="dirichlet", alpha=0.01, min_size=2)
    with pytest.raises(ConfigError, match="at least 1 example"):
        partition_indices([0, 1, 0], 4)


def test_client_partition_covers_the_pool(ag: FederatedData):
    parts = [client_partition(ag, i, 3, scheme="dirichlet", alpha=0.5, seed=2) for i in range(3)]
    ids = [i for p in parts for i in p.source_ids]
    assert sorted(ids) == sorted(ag.train.source_ids)
    assert all(p.label_names == AG_NEWS_LABELS for p in parts)
    first = client_partition(ag, 0, 3, scheme="dirichlet", alpha=0.5, seed=2)
    assert first == parts[0]
    for index in (3, -1):
        with pytest.raises(ConfigError, match="client index"):
            client_partition(ag, index, 3)


def test_parse_partition():
    assert parse_partition("0/1") == (0, 1)
    assert parse_partition(" 2/4 ") == (2, 4)
    for bad in ("3/2", "2/2", "-1/2", "a/b", "1", "1/0", "", "1/2/3"):
        with pytest.raises(ConfigError, match="I/N"):
            parse_partition(bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_clients=0), "num_clients"),
        (dict(num_clients=2, scheme="dirichlet", alpha=0.0), "alpha"),
        (dict(num_clients=2, scheme="dirichlet", alpha=-1.0), "alpha"),
        (dict(num_clients=2, scheme="dirichlet", alpha=float("nan")), "alpha"),
        (dict(num_clients=2, scheme="shards"), "unknown partition scheme 'shards'"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        partition_indices([0, 1, 0, 1], **kwargs)


# --- synthetic files and errors -----------------------------------------------------------------


def test_synthetic_tsv_infers_labels_and_handles_crlf(tmp_path: Path):
    rows = "".join(f"{i % 3}\tsentence number {i}\r\n" for i in range(40))
    path = _write(tmp_path, "toy.tsv", "label\tsentence\r\n" + rows)
    data = load_federated_data(str(path), public_size=5, eval_size=5)
    assert data.name == "toy"
    assert (len(data.eval), len(data.public), len(data.train)) == (5, 5, 30)
    assert data.train.num_labels == 3 and data.train.label_names == ("0", "1", "2")
    assert all(not t.endswith("\r") for t in data.train.texts)
    # columns are found by name, in any order
    swapped = _write(tmp_path, "swapped.tsv", "content\tlabel\nfine\t1\nbad\t0\n")
    assert load_federated_data(str(swapped), public_size=0, eval_size=1).train.num_labels == 2


def test_synthetic_csv_with_quotes_and_escapes(tmp_path: Path):
    body = "".join(f'{1 + i % 4},"Title {i}","Line one\\\\two, #36;{i} ""q"""\n' for i in range(12))
    path = _write(tmp_path, "mini.csv", "label,title,description\n" + body)
    data = load_federated_data(str(path), public_size=2, eval_size=2)
    assert (len(data.eval), len(data.public), len(data.train)) == (2, 2, 8)
    texts = dict(zip(data.train.source_ids, data.train.texts, strict=True))
    some = next(iter(texts))
    assert texts[some] == f'Title {some}. Line one two, ${some} "q"'


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.tsv", "", "is empty"),
        ("blank.csv", "\n\n", "is empty"),
        ("header_only.tsv", "label\tsentence\n", "no examples"),
        ("words.tsv", "label\tsentence\npos\tgreat film\n", r"words\.tsv:2: label 'pos' is not"),
        ("words.csv", 'label,title,description\nx,"a","b"\n', "is not an integer"),
        ("gap.tsv", "label\tsentence\n0\ta\n2\tb\n", r"contiguous 0\.\.2.*\[1\]"),
        ("neg.tsv", "label\tsentence\n-1\ta\n0\tb\n", "out of range"),
        ("range.csv", 'label,title,description\n5,"a","b"\n', r"out of range.*1\.\.4"),
        ("zero.csv", 'label,title,description\n0,"a","b"\n', "out of range"),
        ("cols.tsv", "id\tsentence\n0\ta\n", "label"),
        ("cols.csv", "label,body\n1,a\n", "label,title,description"),
        ("short.tsv", "label\tsentence\n0\n", "expected 2 columns"),
        ("data.json", "{}", "unknown dataset format"),
    ],
)
def test_bad_files_raise_config_error(tmp_path: Path, name: str, content: str, match: str):
    path = _write(tmp_path, name, content)
    with pytest.raises(ConfigError, match=match):
        load_federated_data(str(path), public_size=0, eval_size=1)


def test_sst2_folder_errors(tmp_path: Path):
    (tmp_path / "train.tsv").write_text("label\tsentence\n0\ta\n1\tb\n2\tc\n")
    with pytest.raises(ConfigError, match="dev.tsv"):
        load_federated_data(str(tmp_path))
    (tmp_path / "dev.tsv").write_text("label\tcontent\n0\ta\n")
    with pytest.raises(ConfigError, match=r"train\.tsv:4: label 2 is out of range.*0\.\.1"):
        load_federated_data(str(tmp_path), public_size=1)
    (tmp_path / "train.tsv").write_text("label\tsentence\n0\ta\n1\tb\n")
    with pytest.raises(ConfigError, match="public_size"):
        load_federated_data(str(tmp_path), public_size=2)
    assert len(load_federated_data(str(tmp_path), public_size=1).train) == 1


def test_missing_paths_and_bad_sizes(tmp_path: Path):
    for missing in (tmp_path / "nope.tsv", tmp_path / "nope.csv", tmp_path / "nowhere"):
        with pytest.raises(ConfigError, match="does not exist"):
            load_federated_data(str(missing))
    with pytest.raises(ConfigError, match="neither train.tsv"):
        load_federated_data(str(tmp_path))
    small = _write(tmp_path, "s.tsv", "label\tsentence\n" + "0\ta\n1\tb\n" * 5)
    for kwargs, match in (
        (dict(public_size=-1), "public_size"),
        (dict(eval_size=0), "eval_size"),
        (dict(max_train=0), "max_train"),
        (dict(public_size=8, eval_size=2), "cannot hold"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_federated_data(str(small), **kwargs)


def test_hub_name_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ConfigError, match=r"pip install helora\[online\]"):
        load_federated_data("stanfordnlp/sst2")


def test_text_dataset_subset_and_validation():
    ds = TextDataset(["a", "b", "c"], [0, 1, 0], 2, ["no", "yes"])
    assert isinstance(ds.texts, tuple) and len(ds) == 3
    sub = ds.subset([2, 0])
    assert sub.texts == ("c", "a") and sub.labels == (0, 0) and sub.source_ids == ()
    assert ds.subset([]).num_labels == 2
    with pytest.raises(IndexError):
        ds.subset([3])
    with pytest.raises(ValueError):
        TextDataset(("a",), (0, 1), 2, ("no", "yes"))
