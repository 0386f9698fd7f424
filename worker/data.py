"""Text-classification data for federated clients, read from a path the user gives.

Formats (detected from the path; nothing is copied anywhere):
- a directory with ``train.tsv`` + ``dev.tsv`` (optional ``test.tsv``): SST-2 in GLUE TSV form.
  The train pool and the public distillation set are disjoint seeded slices of ``train.tsv``;
  ``dev.tsv`` is the evaluation split.
- a directory with ``news.csv``, or a ``.csv`` file: AG News (``label,title,description``,
  labels 1..4). The one file is split with a seed into eval / public / train pool.
- a ``.tsv`` file: one GLUE-style file (``label`` + a ``sentence``/``content``/``text`` column),
  split like AG News; labels must be 0..K-1.
- anything else that is not an existing path: a dataset name on the hub, loaded through the
  optional ``datasets`` library (``pip install helora[online]``); ``name:config`` selects a config.

``TextDataset.source_ids`` are 0-based data-row positions in the file (or hub split) each example
came from, so splits can be checked for overlap even where texts repeat.
"""

from __future__ import annotations

import csv
import html
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from helora.shared.errors import ConfigError
from helora.worker.partition import client_partition, parse_partition, partition_indices

__all__ = [
    "AG_NEWS_LABELS",
    "SST2_LABELS",
    "FederatedData",
    "TextDataset",
    "client_partition",
    "load_federated_data",
    "parse_partition",
    "partition_indices",
]

SST2_LABELS = ("negative", "positive")
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
TEXT_COLUMNS = ("sentence", "content", "text")
DEFAULT_EVAL_SIZE = 1000  # single-file datasets (AG News): eval = min(this, 20% of the rows)
_ONLINE_HINT = "pip install helora[online]"
_PASS = "pass an SST-2 folder (train.tsv + dev.tsv), an AG News folder or .csv file, or a .tsv file"
_HTML_NUM = re.compile(r"(?<!&)#(\d+);")  # AG News lost the '&' of its numeric entities
_HTML_TAG = re.compile(r"<[^<>]*>")


@dataclass(frozen=True)
class TextDataset:
    texts: tuple[str, ...]
    labels: tuple[int, ...]  # 0-based, in 0..num_labels-1
    num_labels: int
    label_names: tuple[str, ...]
    source_ids: tuple[int, ...] = ()  # data-row positions in the source; () when unknown

    def __post_init__(self) -> None:
        for name in ("texts", "labels", "label_names", "source_ids"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if len(self.label_names) != self.num_labels:
            raise ValueError(f"{len(self.label_names)} label names for {self.num_labels} labels")
        if self.source_ids and len(self.source_ids) != len(self.texts):
            raise ValueError(f"{len(self.source_ids)} source ids for {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        idx = list(indices)
        n = len(self.texts)
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"subset indices out of range 0..{n - 1}: {bad[:5]}")
        return TextDataset(
            texts=tuple(self.texts[i] for i in idx),
            labels=tuple(self.labels[i] for i in idx),
            num_labels=self.num_labels,
            label_names=self.label_names,
            source_ids=tuple(self.source_ids[i] for i in idx) if self.source_ids else (),
        )

    def label_counts(self) -> list[int]:
        counts = [0] * self.num_labels
        for y in self.labels:
            counts[y] += 1
        return counts


@dataclass(frozen=True)
class FederatedData:
    name: str  # "sst2" | "ag_news" | a single file's name | a datasets hub name
    train: TextDataset  # the pool client partitions are cut from
    public: TextDataset  # public distillation set, disjoint from train (empty if public_size=0)
    eval: TextDataset  # held-out evaluation split no client sees
    test: TextDataset | None = None  # a further labelled test split when there is one (SST-2)


def load_federated_data(
    path_or_name: str,
    *,
    public_size: int = 500,
    eval_size: int | None = None,
    max_train: int | None = None,
    seed: int = 0,
) -> FederatedData:
    """Load a dataset (see the module docstring) and split it deterministically for ``seed``."""
    _check_size("public_size", public_size, minimum=0, optional=False)
    _check_size("eval_size", eval_size, minimum=1)
    _check_size("max_train", max_train, minimum=1)
    sz = _Sizes(public_size, eval_size, max_train, seed)
    text = str(path_or_name).strip()
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "train.tsv").is_file():  # SST-2: eval = dev.tsv, test.tsv kept aside
            if not (path / "dev.tsv").is_file():
                raise ConfigError(f"{path} has train.tsv but no dev.tsv (the eval split); {_PASS}")
            tsv = {
                f: _read_table(path / f, news=False, num_labels=2)
                for f in ("train.tsv", "dev.tsv", "test.tsv")
                if f != "test.tsv" or (path / f).is_file()
            }
            return _split("sst2", tsv["train.tsv"], sz, tsv["dev.tsv"], tsv.get("test.tsv"))
        if (path / "news.csv").is_file():
            return _split("ag_news", _read_table(path / "news.csv", news=True), sz)
        raise ConfigError(f"{path} has neither train.tsv (SST-2) nor news.csv (AG News); {_PASS}")
    if suffix in (".tsv", ".csv") or path.exists() or text.startswith(("/", "./", "../", "~")):
        if not path.exists():
            raise ConfigError(f"dataset path {path} does not exist; {_PASS}")
        if suffix == ".csv":
            return _split("ag_news", _read_table(path, news=True), sz)
        if suffix == ".tsv":
            name = path.parent.name if path.stem in ("train", "dev", "test") else path.stem
            return _split(name or path.stem, _read_table(path, news=False), sz)
        raise ConfigError(f"unknown dataset format: {path}; {_PASS}")
    return _load_hub(text, sz)


# --- reading files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sizes:
    public_size: int
    eval_size: int | None
    max_train: int | None
    seed: int


def _check_size(name: str, value: int | None, *, minimum: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _read_table(path: Path, *, news: bool, num_labels: int | None = None) -> TextDataset:
    """A GLUE TSV (``label`` + sentence/content/text; labels 0..K-1, K inferred when
    ``num_labels`` is None) or, with ``news``, an AG News CSV (labels 1..4 -> 0..3)."""
    if not path.is_file():
        raise ConfigError(f"dataset file {path} does not exist; check the path")
    first, count = (1, len(AG_NEWS_LABELS)) if news else (0, num_labels)
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            if news:
                reader = csv.reader(fh)
            else:
                reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = [c.strip().lower() for c in next(reader, [])]
            if not any(header):
                raise ConfigError(
                    f"{path} is empty; expected a header line and one example per line"
                )
            if news:
                wanted = [c for c in ("title", "description") if c in header]
            else:
                wanted = [c for c in TEXT_COLUMNS if c in header][:1]
            if "label" not in header or not wanted:
                need = "label,title,description" if news else "label<TAB>sentence (or content)"
                raise ConfigError(f"{path}: header {header} lacks the columns; expected {need}")
            li, tis = header.index("label"), [header.index(c) for c in wanted]
            texts, labels = [], []
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not any(f.strip() for f in row):
                    continue
                if len(row) <= max(li, *tis):
                    raise ConfigError(f"{where}: expected {len(header)} columns, got {len(row)}")
                labels.append(_parse_label(row[li], where, first, count))
                if news:
                    texts.append(". ".join(filter(None, (_clean_news(row[i]) for i in tis))))
                else:
                    texts.append(row[tis[0]].strip())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8") from None
    if news:
        names: Sequence[str] = AG_NEWS_LABELS
    else:
        count = count or _contiguous(labels, str(path))
        sst = count == 2 and (num_labels == 2 or "sst" in path.parent.name.lower())
        names = SST2_LABELS if sst else [str(i) for i in range(count)]
    return _dataset(texts, labels, count, names, str(path))


def _parse_label(raw: str, where: str, first: int, count: int | None) -> int:
    try:
        value = int(raw.strip()) - first
    except ValueError:
        raise ConfigError(
            f"{where}: label {raw!r} is not an integer; every row must start with its class id"
        ) from None
    if value < 0 or (count is not None and value >= count):
        top = "K-1" if count is None else str(count - 1 + first)
        raise ConfigError(
            f"{where}: label {raw.strip()} is out of range; labels must be {first}..{top}"
        )
    return value


def _clean_news(s: str) -> str:
    """AG News escapes: a backslash stands for a line break, '#39;' is '&#39;' without its '&',
    and entities such as '&lt;' wrap HTML links; keep plain text only."""
    s = html.unescape(_HTML_NUM.sub(r"&#\1;", s.replace("\\", " ")))
    return " ".join(_HTML_TAG.sub(" ", s).split())


def _contiguous(labels: Sequence[int], where: str) -> int:
    num = max(labels, default=-1) + 1
    missing = sorted(set(range(num)) - set(labels))
    if missing:
        raise ConfigError(
            f"{where}: labels must be contiguous 0..{num - 1}, but {missing[:10]} "
            "never occur; renumber the classes"
        )
    return num


def _dataset(
    texts: list[str], labels: list[int], num_labels: int, names: Sequence[str], where: str
) -> TextDataset:
    if not texts:
        raise ConfigError(f"{where} has a header but no examples")
    return TextDataset(
        tuple(texts), tuple(labels), num_labels, tuple(names), tuple(range(len(texts)))
    )


# --- splitting --------------------------------------------------------------------------------


def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(f"helora-data/{seed}/{purpose}")


def _cap(ds: TextDataset, size: int | None, seed: int) -> TextDataset:
    if size is None or size >= len(ds):
        return ds
    return ds.subset(sorted(_rng(seed, "eval").sample(range(len(ds)), size)))


def _split(
    name: str,
    full: TextDataset,
    sz: _Sizes,
    held_out: TextDataset | None = None,
    test: TextDataset | None = None,
) -> FederatedData:
    """Seeded and disjoint: eval (``held_out`` capped by eval_size, or else carved out of
    ``full``), public (``public_size`` rows of ``full``) and the train pool (the rest of ``full``,
    capped by max_train)."""
    n = len(full)
    n_eval = 0 if held_out is not None else sz.eval_size or min(DEFAULT_EVAL_SIZE, n // 5)
    if (held_out is None and n_eval < 1) or n_eval + sz.public_size >= n:
        raise ConfigError(
            f"{name}: {n} examples cannot hold eval={n_eval} + public_size="
            f"{sz.public_size} and leave training examples; lower those sizes"
        )
    order = list(range(n))
    _rng(sz.seed, "split").shuffle(order)
    cut = n_eval + sz.public_size
    pool, public = order[cut:][: sz.max_train], order[n_eval:cut]
    if held_out is not None:
        evaluation = _cap(held_out, sz.eval_size, sz.seed)
    else:
        evaluation = full.subset(sorted(order[:n_eval]))
    return FederatedData(
        name, full.subset(sorted(pool)), full.subset(sorted(public)), evaluation, test
    )


# --- hub (online only) ------------------------------------------------------------------------


def _load_hub(name: str, sz: _Sizes) -> FederatedData:
    """A dataset by hub name ("ag_news", "stanfordnlp/sst2", "glue:sst2") via ``datasets``."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{name!r} is not an existing path, so it was taken as a hub dataset name, but the "
            f"optional `datasets` library is not installed: {_ONLINE_HINT} (or pass the path "
            "of a local copy, e.g. ../shared/data/sst2)"
        ) from None
    repo, _, config = name.partition(":")
    try:
        splits = datasets.load_dataset(repo, config or None)
    except Exception as exc:  # network, unknown name, bad config: all user-facing
        raise ConfigError(f"could not load hub dataset {name!r}: {exc}") from exc
    if "train" not in splits:
        raise ConfigError(f"hub dataset {name!r} has no 'train' split (has {list(splits)})")
    train = _from_hub_split(splits["train"], f"{name}[train]")
    held_out = next((s for s in ("validation", "test") if s in splits), None)
    if held_out is None:
        return _split(name, train, sz)
    return _split(name, train, sz, _from_hub_split(splits[held_out], f"{name}[{held_out}]"))


def _from_hub_split(split, where: str) -> TextDataset:
    cols = list(split.column_names)
    text_col = next((c for c in TEXT_COLUMNS if c in cols), None)
    if "label" not in cols or text_col is None:
        raise ConfigError(f"{where}: columns {cols} need 'label' and one of {TEXT_COLUMNS}")
    labels = [int(y) for y in split["label"]]
    names = getattr(split.features.get("label"), "names", None)
    num = len(names) if names else _contiguous(labels, where)
    bad = next((y for y in labels if not 0 <= y < num), None)
    if bad is not None:
        raise ConfigError(f"{where}: label {bad} is out of range 0..{num - 1} (unlabelled split?)")
    names = tuple(names) if names else tuple(str(i) for i in range(num))
    return _dataset([str(t) for t in split[text_col]], labels, num, names, where)
